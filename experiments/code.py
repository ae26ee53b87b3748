"""CALM for code (the paper's code setting), at CPU scale.

Data (calm_jax/data/code_corpus.py), all from what this machine installs:

  m_A (augmenting)  learns Python: the interpreter's own standard library,
                    de-duplicated and split by file (`code_train`).
  m_B (anchor)      learns English prose: the fortune files of the Debian
                    package `fortunes` (`prose_train`; apt-get install
                    fortunes).
  CALM              composes them on D_C = text-to-code (docstring ->
                    function body) and code-to-text (function -> docstring)
                    pairs from ~7% of the files (`pairs_compose`).
  full_ft           m_B fully fine-tuned on m_A's code corpus.
  lora              LoRA on m_B with CALM's trainable parameter count, on D_C.

Evaluation, on files no model saw: loss on held-out code (`code_eval`) and
on text-to-code pairs (`doc2code_eval`); chrF of generated docstrings
(`code2doc_eval`); and the pass rate of generated function bodies run
against their own doctests in a sandboxed subprocess (`doctest_eval`: every
held-out function whose true body passes its doctests).

  python -m calm_jax.main --config=experiments/code.py --workdir=DIR
  python -m calm_jax.main --config=experiments/code.py:smoke --workdir=DIR

With real checkpoints (a calm_jax model directory or a Hugging Face one),
the data is tokenized with the anchor's tokenizer, which every model must
share (checked before anything runs), and the rows that pretrain nothing
are the ones to keep:

  python -m calm_jax.main --config=experiments/code.py --workdir=DIR \
    --config.models.anchor.checkpoint=ANCHOR_DIR \
    --config.models.augmenting.code.checkpoint=CODE_LM_DIR \
    --config.data.seq_len=1024 --config.frozen_dtype=bfloat16
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
  # Fields shared by every experiment (calm_jax/config_lib.py:data_config):
  # the tokenizer is bytes, or the anchor checkpoint's when it has one.
  config.data = config_lib.data_config(
      'code_corpus',
      # Bytes per example, BOS/EOS included: data.code.max_chars + 1.
      seq_len=128 if smoke else 384)
  config.data.code = ml_collections.ConfigDict(dict(
      seed=0,
      # '' = this interpreter's standard library.
      stdlib_dir='',
      prose_dir='/usr/share/games/fortunes',
      eval_file_fraction=0.1,
      compose_file_fraction=0.07 if not smoke else 0.2,
      prose_eval_fraction=0.05,
      max_chars=127 if smoke else 383,
      num_code_eval=32 if smoke else 512,
      num_pairs_eval=16 if smoke else 256,
      # 0 = every file; smoke reads a deterministic subset.
      max_files=80 if smoke else 0,
      max_prose_records=1500 if smoke else 0,
      check_doctests=True,
  ))

  # -------------------------------------------------------------- models
  config.models = ml_collections.ConfigDict()
  anchor = dict(vocab_size=259, d_model=64 if smoke else 160,
                num_layers=4, num_heads=4, d_ff=128 if smoke else 640,
                max_len=config.data.seq_len)
  augmenting = dict(vocab_size=259, d_model=32 if smoke else 96,
                    num_layers=4, num_heads=2 if smoke else 4,
                    d_ff=64 if smoke else 384, max_len=config.data.seq_len)
  config.models.anchor = config_lib.model_config(
      arch=anchor,
      pretrain=config_lib.train_config(
          split='prose_train', steps=20 if smoke else 1000,
          batch_size=8 if smoke else 16, learning_rate=3e-3,
          eval_every=0, log_every=10 if smoke else 250))
  config.models.augmenting = ml_collections.ConfigDict()
  # Two pairs (every second layer): the bridge also writes into the
  # anchor's middle layers.
  config.models.augmenting.code = config_lib.model_config(
      arch=augmenting,
      pretrain=config_lib.train_config(
          split='code_train', steps=20 if smoke else 1000,
          batch_size=8 if smoke else 16, learning_rate=3e-3,
          eval_every=0, log_every=10 if smoke else 250),
      every_k=2)

  # --------------------------------------------------------- composition
  config.composition = config_lib.composition_config()
  # D_C is small (523 pairs at the defaults): 120 steps of 16 is ~3.7
  # epochs. Longer, the bridge memorises it (see experiments/ntl.py); the
  # `pairs_dev` loss in the log shows where that starts.
  config.train = config_lib.train_config(
      split='pairs_compose', steps=10 if smoke else 120,
      batch_size=8 if smoke else 16, learning_rate=3e-3 if smoke else 1e-3,
      eval_every=10 if smoke else 20, log_every=10 if smoke else 20,
      checkpoint_every=10 if smoke else 60)

  # ---------------------------------------------------------------- rows
  config.rows = ('m_A', 'm_B', 'calm', 'full_ft', 'lora')
  config.seeds = (0,)
  config.baselines = config_lib.baselines_config()
  # The paper's "m_B + code": the anchor fine-tuned on m_A's corpus.
  config.baselines.full_ft_split = 'code_train'
  config.baselines.full_ft_steps = 0 if smoke else 300

  # ---------------------------------------------------------------- eval
  config.eval = ml_collections.ConfigDict()
  # HumanEval (the paper's metric): the problems that fit data.seq_len with
  # the tokenizer (the log says how many of the 164; few at byte level and
  # 384 tokens, most with a real checkpoint's BPE at 1024), pass@1 of
  # greedy completions.
  config.eval.splits = (('code_eval', 'doc2code_eval', 'code2doc_eval') +
                        (() if smoke else ('doctest_eval', 'humaneval')))
  config.eval.metrics = ml_collections.ConfigDict(dict(
      code_eval='loss', doc2code_eval='loss', code2doc_eval='chrf',
      **({} if smoke else {'doctest_eval': 'pass_rate',
                           'humaneval': 'pass_at_k'})))
  # pass@k of `n` sampled completions per HumanEval problem besides the
  # greedy one (0: greedy pass@1 only); e.g. n=20, k=(1, 10) on a pod.
  config.eval.sampling = ml_collections.ConfigDict(dict(
      n=0, k=(1,), temperature=0.8, top_k=0, top_p=0.95))
  config.eval.num_examples = 16 if smoke else 128
  config.eval.batch_size = 8 if smoke else 32
  config.eval.max_new_tokens = 32 if smoke else 192
  # Exact match is read off the loss pass's argmaxes when the tokenizer
  # spells each text one way (byte, char): the same completions as
  # greedy decoding, without decoding (calm_jax/evaluation.py). True
  # decodes every prompt instead.
  config.eval.exact_match_decode = False
  # Loss on `pairs_dev` (pairs of non-compose training files) while
  # training: D_C is small, so this shows when the bridge memorises it.
  config.eval.during_training_split = 'pairs_dev'
  # Limits of each sandboxed run of generated code (bubblewrap,
  # calm_jax/sandbox.py); unsafe=True runs it in a plain subprocess where
  # bubblewrap is missing (no isolation: for trusted machines only).
  config.eval.sandbox = ml_collections.ConfigDict(dict(
      timeout_s=5.0, memory_mb=512, unsafe=False))

  config.mesh = config_lib.mesh_config()
  return config
