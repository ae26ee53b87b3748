"""CALM for low-resource languages (the paper's NTL setting), at CPU scale.

Data: the gettext catalogs shipped in the pinned Django wheel (see
calm_jax/data/ntl.py): ~98 languages with up to ~820 English messages each.

  m_A (augmenting)  learns the non-English text of every language
                    (`mono_train`).
  m_B (anchor)      learns English, a few high-resource languages, and
                    X -> English translation for those languages only
                    (`anchor_train`).
  CALM              composes them on D_C = X -> English pairs for ~5% of the
                    messages of the low-resource languages (`compose`).
  full_ft           m_B fully continued-pretrained on m_A's data.

Evaluation: chrF of greedy X -> English translations of held-out messages,
per low-resource language and averaged (`eval`), the same for the
high-resource languages (`eval_high`), and m_A's held-out loss on
low-resource text (`mono_eval`).

  python -m calm_jax.main --config=experiments/ntl.py --workdir=DIR
  python -m calm_jax.main --config=experiments/ntl.py:smoke --workdir=DIR

Two tokenizers (`aligned`, `aligned_smoke`): the anchor reads bytes, m_A a
byte-level BPE trained here on its own corpus (`bpe:N`), and the
composition aligns the two token streams by characters
(composition.align='chars', calm_jax/data/align.py).

  python -m calm_jax.main --config=experiments/ntl.py:aligned --workdir=DIR

On a TPU pod, point `models.*.checkpoint` at real checkpoints (a calm_jax
model directory or a Hugging Face one): the data is then tokenized with the
anchor's tokenizer (`data.tokenizer` '' = 'anchor'), which every model must
share (checked before anything runs).
"""

from __future__ import annotations

import ml_collections

from calm_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = config_lib.parse_variant(
      arg, ('default', 'smoke', 'aligned', 'aligned_smoke'))
  smoke = variant.endswith('smoke')
  aligned = variant.startswith('aligned')

  # seed, frozen_dtype, remat, attention (calm_jax/config_lib.py).
  config = config_lib.base_config()

  # ---------------------------------------------------------------- data
  # Fields shared by every experiment (calm_jax/config_lib.py:data_config):
  # the tokenizer is bytes, or the anchor checkpoint's when it has one.
  config.data = config_lib.data_config(
      'ntl_catalogs',
      # Bytes per example, BOS/EOS included: data.ntl.max_chars + 1.
      seq_len=64 if smoke else 128)
  config.data.ntl = ml_collections.ConfigDict(dict(
      seed=0,
      # '' = the catalogs of the installed (pinned) Django.
      po_root='',
      high_resource=('fr', 'de', 'es') if smoke else (
          'fr', 'de', 'es', 'it', 'pt', 'ru', 'zh_Hans', 'ja'),
      low_resource=('hsb', 'ga', 'cy') if smoke else (
          'dsb', 'hsb', 'ga', 'gd', 'ky', 'ms', 'eo', 'af', 'ia', 'cy'),
      compose_fraction=0.05 if not smoke else 0.2,
      eval_fraction=0.15,
      max_chars=63 if smoke else 127,
      num_eval_per_lang=8 if smoke else 48,
      # 0 = every message; smoke reads a few per language.
      max_messages_per_lang=60 if smoke else 0,
  ))

  # -------------------------------------------------------------- models
  config.models = ml_collections.ConfigDict()
  anchor = dict(vocab_size=259, d_model=64 if smoke else 160,
                num_layers=4, num_heads=4, d_ff=128 if smoke else 640,
                max_len=config.data.seq_len)
  augmenting = dict(vocab_size=259, d_model=32 if smoke else 80,
                    num_layers=4, num_heads=2 if smoke else 4,
                    d_ff=64 if smoke else 320, max_len=config.data.seq_len)
  config.models.anchor = config_lib.model_config(
      arch=anchor,
      pretrain=config_lib.train_config(
          split='anchor_train', steps=30 if smoke else 1500,
          batch_size=16 if smoke else 32, learning_rate=3e-3,
          eval_every=0, log_every=10 if smoke else 250))
  config.models.augmenting = ml_collections.ConfigDict()
  # Two pairs (every second layer), so that the bridge also writes into the
  # anchor's middle, where translation is still being computed.
  config.models.augmenting.ntl = config_lib.model_config(
      arch=augmenting,
      pretrain=config_lib.train_config(
          split='mono_train', steps=30 if smoke else 1500,
          batch_size=16 if smoke else 32, learning_rate=3e-3,
          eval_every=0, log_every=10 if smoke else 250),
      every_k=2)
  if aligned:
    # m_A reads its own vocabulary: a byte-level BPE of N ids trained on
    # its pretraining split (mono_train) before it is pretrained.
    n = 512 if smoke else 2048
    config.models.augmenting.ntl.tokenizer = f'bpe:{n}'
    config.models.augmenting.ntl.arch.vocab_size = n

  # --------------------------------------------------------- composition
  config.composition = config_lib.composition_config()
  # D_C is small (333 pairs at the defaults): 40 steps of 32 is ~4 epochs.
  # Trained for 300 steps the bridge memorises it: the loss on `dev` falls
  # for about 25 steps, then rises (docs/research/).
  config.train = config_lib.train_config(
      split='compose', steps=20 if smoke else 40,
      batch_size=16 if smoke else 32, learning_rate=3e-3 if smoke else 1e-3,
      eval_every=10, log_every=10, checkpoint_every=20)

  # ---------------------------------------------------------------- rows
  config.rows = ('m_A', 'm_B', 'calm', 'full_ft')
  config.seeds = (0,)
  config.baselines = config_lib.baselines_config()
  # The paper's "m_B + NTL": the anchor continued-pretrained on m_A's data.
  config.baselines.full_ft_split = 'mono_train'
  config.baselines.full_ft_steps = 0 if smoke else 300

  # ---------------------------------------------------------------- eval
  config.eval = ml_collections.ConfigDict()
  config.eval.splits = ('eval', 'eval_high', 'mono_eval')
  config.eval.metrics = ml_collections.ConfigDict(dict(
      eval='chrf', eval_high='chrf', mono_eval='loss'))
  config.eval.num_examples = 0  # All (capped per language by data.ntl).
  config.eval.batch_size = 16 if smoke else 64
  config.eval.max_new_tokens = 48 if smoke else 100
  # Exact match is read off the loss pass's argmaxes when the tokenizer
  # spells each text one way (byte, char): the same completions as
  # greedy decoding, without decoding (calm_jax/evaluation.py). True
  # decodes every prompt instead.
  config.eval.exact_match_decode = False
  # Loss on `dev` (pairs of train msgids, never trained on) while training:
  # D_C is small, so this shows when the bridge starts memorising it.
  config.eval.during_training_split = 'dev'

  config.mesh = config_lib.mesh_config()
  return config
