r"""Compose these checkpoints on this data.

  python -m calm_jax.main --config=experiments/compose.py --workdir=W \
    --config.models.anchor.checkpoint=ANCHOR_DIR \
    --config.models.augmenting.aug.checkpoint=AUG_DIR \
    --config.data.train=TRAIN.jsonl --config.data.eval=EVAL.jsonl

The anchor (m_B) and the augmenting model (m_A, named `aug`) are frozen
checkpoints: Hugging Face directories (config.json + *.safetensors, with
their tokenizer) or calm_jax model directories. They must share one
tokenizer, which also reads the data. Only the bridges train.

Each JSONL line is {"prompt": ..., "completion": ...} (the loss covers the
completion) or {"text": ...} (every token); `data.dataset='text'` reads
plain-text files instead, `'tfds'` a TFDS dataset by name. The run writes
`W/results.json` (eval loss and exact match of each row) and, for each
composition, `W/runs/<row>/seed_<s>/composition.json`, which
`python -m calm_jax.generate --composition=W/runs/calm/seed_0` reads.

`:smoke` is the same at test sizes.
"""

from __future__ import annotations

import ml_collections

from calm_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = config_lib.parse_variant(arg, ('default', 'smoke'))
  smoke = variant == 'smoke'

  # seed, frozen_dtype, remat, attention (calm_jax/config_lib.py).
  config = config_lib.base_config()

  # ---------------------------------------------------------------- data
  config.data = config_lib.data_config(
      # 'jsonl' (your files), 'text' (plain-text files) or 'tfds' (by name).
      'jsonl',
      # Tokens per row; 0: the models' shortest context, at most 1024.
      seq_len=64 if smoke else 0,
      # Short examples share a row (attention stays within each).
      pack=True)
  # Also in config.data (see config_lib.data_config): `train` and `eval`
  # (files or globs; '' eval = `eval_fraction` of train), the field names
  # `prompt_key`, `completion_key`, `text_key`, and `tokenizer` ('' = the
  # anchor checkpoint's).

  # -------------------------------------------------------------- models
  config.models = ml_collections.ConfigDict()
  no_pretraining = config_lib.train_config(split='train')
  # The anchor m_B: a checkpoint directory (required).
  config.models.anchor = config_lib.model_config(arch={},
                                                 pretrain=no_pretraining)
  # Augmenting models by name; `aug.checkpoint` is required, `aug.every_k`
  # (the paper's rule: every k-th layer) or explicit `aug.pairs`
  # ((aug_layer, anchor_layer), ...) choose where the bridges join.
  config.models.augmenting = ml_collections.ConfigDict()
  config.models.augmenting.aug = config_lib.model_config(
      arch={}, pretrain=no_pretraining, every_k=4)

  # --------------------------------------------------------- composition
  # The paper's bridges (cross_heads 0 = the anchor's head count).
  config.composition = config_lib.composition_config()
  # Training of the bridges on data.train.
  config.train = config_lib.train_config(
      split='train', steps=20 if smoke else 500, batch_size=8 if smoke else 16,
      learning_rate=1e-3, log_every=10 if smoke else 50,
      eval_every=10 if smoke else 100, checkpoint_every=10 if smoke else 250)

  # ---------------------------------------------------------------- rows
  # Each model alone and composed; also 'calm_paper', 'lora', 'full_ft',
  # 'calm_random_aug', 'calm_prompt_only', 'calm_n1', 'calm_n2',
  # 'calm_every_layer' (see calm_jax/rows.py). 'calm_vanilla_aug' needs
  # models.augmenting.aug.vanilla_checkpoint.
  config.rows = ('m_A', 'm_B', 'calm')
  # Seeds of the trained rows.
  config.seeds = (0,)
  # Settings of the baseline rows (LoRA rank and targets, full_ft's split).
  config.baselines = config_lib.baselines_config()

  # ---------------------------------------------------------------- eval
  config.eval = ml_collections.ConfigDict()
  # Splits every row is scored on: `eval` is data.eval.
  config.eval.splits = ('eval',)
  # Exact match of greedy completions ('loss' for data without prompts).
  config.eval.metrics = ml_collections.ConfigDict(dict(eval='exact_match'))
  # Examples scored (0: all) and the decoding batch.
  config.eval.num_examples = 0
  config.eval.batch_size = 8 if smoke else 32
  # Greedy decoding budget per completion.
  config.eval.max_new_tokens = 32 if smoke else 128
  # Exact match is read off the loss pass's argmaxes when the tokenizer
  # spells each text one way (byte, char): the same completions as
  # greedy decoding, without decoding (calm_jax/evaluation.py). True
  # decodes every prompt instead.
  config.eval.exact_match_decode = False
  # Loss on this split while the bridges train ('' = none).
  config.eval.during_training_split = 'eval'

  # Device mesh (data, fsdp, tensor) and extra logical-axis rules.
  config.mesh = config_lib.mesh_config()
  return config
