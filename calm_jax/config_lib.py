"""Experiment config building blocks and the up-front validation pass.

Experiments (`experiments/*.py`) assemble their config from the helpers here
so every experiment has the same fields. `validate` runs before any data is
built or any model is compiled, and fails with a message that names the
offending field and the fix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from etils import epath
import ml_collections

from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

ConfigDict = ml_collections.ConfigDict
MODEL_FILE = 'model.json'


def parse_variant(arg: str | None, variants: Sequence[str]) -> str:
  """The variant named by `--config=FILE:VARIANT`; '' or None is the first."""
  variant = (arg or '').strip() or variants[0]
  if variant not in variants:
    raise ValueError(f'Unknown config variant {variant!r}; use one of '
                     f'{list(variants)}, e.g. --config=FILE:{variants[-1]}.')
  return variant


def train_config(**overrides: Any) -> ConfigDict:
  """Fields of one training run (the composition's, or a pretraining)."""
  c = ConfigDict()
  # Dataset split the run trains on.
  c.split = ''
  # Optimizer steps in total.
  c.steps = 1000
  # Global batch size (divisible by the data-parallel device count).
  c.batch_size = 32
  # Tokens per example for this run; 0: data.seq_len. A split of short
  # examples (e.g. numerals only) trains faster with less padding; every
  # example of `split` must fit (checked before the run starts).
  c.seq_len = 0
  # Peak AdamW learning rate, reached after `warmup_steps`, then cosine.
  c.learning_rate = 1e-3
  c.warmup_steps = 0  # 0: 5% of steps.
  # Final learning rate as a fraction of the peak.
  c.min_lr_ratio = 0.1
  c.weight_decay = 0.01
  c.b1 = 0.9
  c.b2 = 0.98
  # Global gradient-norm clipping (0: off).
  c.grad_clip = 1.0
  # Steps between log lines, evals (0: only at the end) and checkpoints.
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 500
  # Checkpoints kept in the workdir.
  c.keep_checkpoints = 2
  c.update(overrides)
  return c


def model_config(arch: dict[str, Any], pretrain: ConfigDict,
                 every_k: int = 4) -> ConfigDict:
  """One model: its architecture, where it comes from, how it composes."""
  c = ConfigDict()
  # A module of calm_jax.models that builds the network.
  c.model = 'transformer'
  # A calm_jax model directory (see checkpoints.save_model); '' means
  # pretrain it with `pretrain` and cache it in the workdir.
  c.checkpoint = ''
  # Architecture fields of transformer.DecoderConfig.
  c.arch = ConfigDict(arch)
  c.pretrain = pretrain
  # Augmenting models only: every k-th layer is paired with the anchor
  # (n = num_layers // k), unless explicit (aug_layer, anchor_layer) pairs
  # are given; anchor_layer -1 is the anchor's embeddings.
  c.every_k = every_k
  c.pairs = ()
  # Augmenting models only, for the `calm_vanilla_aug` row: the same
  # architecture pretrained on this split instead (or loaded from a path).
  c.vanilla_split = ''
  c.vanilla_checkpoint = ''
  return c


def composition_config(**overrides: Any) -> ConfigDict:
  """The trainable bridges (see calm_jax/models/composition.py)."""
  c = ConfigDict()
  # Cross-attention heads; 0 means the anchor's head count (the paper's).
  c.cross_heads = 0
  # Ablation: the augmenting model reads the prompt only.
  c.prompt_only = False
  # Ours: a learnt per-head recency bias -slope * (t - s) in every bridge,
  # so a head can read m_A at the anchor's own position (the paper's f_cross
  # has none; content alone cannot find it among repeated tokens).
  c.recency_bias = False
  # Initial slope of the sharpest recency head (the others start flatter,
  # down to 1/64 of it); larger reads m_A's own position more exclusively
  # from the first step.
  c.recency_max_slope = 1.0
  # Ours: False drops the content term of the bridges' attention (no query
  # or key projections), leaving the recency bias alone to choose which m_A
  # positions to read (needs recency_bias). The paper's f_cross takes its
  # queries from the anchor.
  c.anchor_queries = True
  # Ours (0: the paper's linear f_proj): > 0 follows the projection with a
  # residual GELU MLP of this width, so a bridge can map m_A's state to
  # what the anchor needs non-linearly.
  c.proj_hidden = 0
  # Ours (0: the paper): adds weight x the mean over tokens of the squared
  # norm of what the bridges write into the anchor's stream to the training
  # loss, so they leave alone what D_C does not need them to change.
  c.write_penalty = 0.0
  # Compute m_A's states on D_C once, store them in WORKDIR/aug_cache and
  # read them every step instead of running m_A.
  c.cache_augmenting = False
  c.update(overrides)
  return c


def baselines_config() -> ConfigDict:
  c = ConfigDict()
  # LoRA rank; 0 matches CALM's trainable parameter count (the paper's).
  c.lora_rank = 0
  # Regexes of the anchor kernels LoRA adapts; () = attention query/value.
  c.lora_targets = ()
  # Split the `full_ft` row trains m_B on; '' = train.split (D_C). The code
  # and NTL settings fine-tune on m_A's own corpus instead.
  c.full_ft_split = ''
  # Steps of the `full_ft` row; 0 = train.steps. Continued pretraining on
  # m_A's corpus usually wants a longer schedule than the composition.
  c.full_ft_steps = 0
  return c


def mesh_config() -> ConfigDict:
  c = ConfigDict()
  # Device mesh axis sizes; -1 takes the remaining devices.
  c.data = -1
  c.fsdp = 1
  c.tensor = 1
  # Extra (logical_axis, mesh_axis) rules placed before the defaults.
  c.rules = ()
  return c


# ------------------------------------------------------------------ models


def decoder_config(model_cfg: ConfigDict, field: str
                   ) -> transformer.DecoderConfig:
  """The architecture of a config'd model, from its checkpoint if it has one."""
  if model_cfg.checkpoint:
    return read_model_file(model_cfg.checkpoint, field)
  return transformer.DecoderConfig.from_dict(model_cfg.arch.to_dict(),
                                             f'{field}.arch')


def read_model_file(path: str, field: str) -> transformer.DecoderConfig:
  """Reads a model directory's architecture, failing clearly if absent."""
  path = os.fspath(path)
  meta = os.path.join(path, MODEL_FILE)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(
        f'{field}.checkpoint: no model directory at {path!r}. Point it at a '
        'directory written by calm_jax or a Hugging Face checkpoint, or set '
        "it to '' to pretrain.")
  if is_hf_checkpoint(path):
    from calm_jax import hf_import  # Deferred: reads safetensors.
    return hf_import.read_config(path)[1]
  try:
    arch = json.loads(epath.Path(meta).read_text())['arch']
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
        f'{field}.checkpoint: {meta!r} is missing or corrupted ({e}). The '
        'directory is not a complete calm_jax model; re-export it or set '
        f"{field}.checkpoint to '' to pretrain.") from e
  return transformer.DecoderConfig.from_dict(arch, f'{field}.checkpoint')


def is_hf_checkpoint(path: str) -> bool:
  """A Hugging Face layout (config.json) rather than calm_jax's own."""
  p = epath.Path(path)
  return not (p / MODEL_FILE).exists() and (p / 'config.json').exists()


def augmenting_models(config: ConfigDict
                      ) -> tuple[composition_lib.Augmenting, ...]:
  """The augmenting models with their layer pairs (validated)."""
  anchor = decoder_config(config.models.anchor, 'models.anchor')
  out = []
  for name, m in config.models.augmenting.items():
    field = f'models.augmenting.{name}'
    arch = decoder_config(m, field)
    if m.pairs:
      pairs = composition_lib.validate_pairs(
          m.pairs, arch.num_layers, anchor.num_layers, f'{field}.pairs')
    else:
      pairs = composition_lib.select_pairs(
          arch.num_layers, anchor.num_layers, m.every_k, field)
    out.append(composition_lib.Augmenting(name, arch, pairs))
  return tuple(out)


# -------------------------------------------------------------- validation


def validate(config: ConfigDict, devices: Sequence[Any] | None = None
             ) -> None:
  """Checks a whole experiment config before any compute.

  `devices` (default: all) are what the mesh and batch sizes are checked
  against.
  """
  from calm_jax import data as data_lib  # Deferred: pulls in TFDS.
  from calm_jax import sharding  # Deferred: touches the backend.

  mesh = make_mesh(config, devices)

  data_lib.validate_config(config.data)
  splits = data_lib.split_names(config.data.dataset)

  def check_split(split, field):
    if split not in splits:
      raise ValueError(f'{field}={split!r} is not a split of dataset '
                       f'{config.data.dataset!r}; choose one of {splits}.')

  def check_train(t, field):
    check_split(t.split, f'{field}.split')
    for name in ('steps', 'batch_size'):
      if int(t[name]) <= 0:
        raise ValueError(f'{field}.{name} must be positive, got {t[name]}.')
    if t.learning_rate <= 0:
      raise ValueError(f'{field}.learning_rate must be positive.')
    seq_len = t.get('seq_len', 0)
    if (not isinstance(seq_len, int) or seq_len == 1 or
        not 0 <= seq_len <= config.data.seq_len):
      raise ValueError(
          f'{field}.seq_len={seq_len!r} must be 0 (use data.seq_len) or an '
          f'int in [2, data.seq_len={config.data.seq_len}].')
    sharding.check_batch_size(t.batch_size, mesh, f'{field}.batch_size')

  if not config.models.augmenting:
    raise ValueError('models.augmenting is empty; CALM needs at least one '
                     'augmenting model.')
  roles = [('models.anchor', config.models.anchor)] + [
      (f'models.augmenting.{n}', m) for n, m in config.models.augmenting.items()]
  vocab = {}
  tokenizer_vocab = data_lib.tokenizer_vocab_size(config.data.tokenizer)
  for field, m in roles:
    check_model_name(m.model, f'{field}.model')
    arch = decoder_config(m, field)
    vocab[field] = arch.vocab_size
    if arch.vocab_size < tokenizer_vocab:
      raise ValueError(
          f'{field}.arch.vocab_size={arch.vocab_size} is smaller than the '
          f'{config.data.tokenizer!r} tokenizer ({tokenizer_vocab} ids); '
          f'set it to at least {tokenizer_vocab}.')
    if arch.max_len < config.data.seq_len:
      raise ValueError(
          f'{field}.arch.max_len={arch.max_len} is shorter than '
          f'data.seq_len={config.data.seq_len}; raise max_len or lower '
          'seq_len.')
    if not m.checkpoint:
      check_train(m.pretrain, f'{field}.pretrain')
  if len(set(vocab.values())) > 1:
    raise ValueError(
        'Models with different vocabularies cannot be composed: '
        + ', '.join(f'{f}.vocab_size={v}' for f, v in vocab.items())
        + '. Use models that share one tokenizer.')
  augmenting_models(config)  # Layer pairs.
  from calm_jax import rows as rows_lib
  if not config.rows:
    raise ValueError("rows is empty; list the table's rows, e.g. "
                     "('m_B', 'm_A', 'calm').")
  for i, row in enumerate(config.rows):
    if row not in rows_lib.BUILDERS:
      raise ValueError(f'rows[{i}]={row!r} is not a known row; choose from '
                       f'{sorted(rows_lib.BUILDERS)}.')
  if config.frozen_dtype not in transformer.DTYPES:
    raise ValueError(f'frozen_dtype={config.frozen_dtype!r} is not one of '
                     f'{sorted(transformer.DTYPES)}.')
  if not config.seeds:
    raise ValueError('seeds is empty; give at least one, e.g. (0,).')
  if 'calm_vanilla_aug' in config.rows:
    for name, m in config.models.augmenting.items():
      if not m.vanilla_checkpoint:
        check_split(m.vanilla_split,
                    f'models.augmenting.{name}.vanilla_split')
  check_train(config.train, 'train')
  slope = config.composition.get('recency_max_slope', 1.0)
  if not isinstance(slope, (int, float)) or not slope > 0:
    raise ValueError(f'composition.recency_max_slope={slope!r} must be a '
                     'positive number (1.0: the sharpest head starts at '
                     'slope 1).')
  hidden = config.composition.get('proj_hidden', 0)
  if not isinstance(hidden, int) or hidden < 0:
    raise ValueError(f'composition.proj_hidden={hidden!r} must be an integer '
                     '>= 0 (0: the paper\'s linear f_proj).')
  penalty = config.composition.get('write_penalty', 0.0)
  if not isinstance(penalty, (int, float)) or not penalty >= 0:
    raise ValueError(f'composition.write_penalty={penalty!r} must be a '
                     'number >= 0 (0: no penalty, the paper).')
  if (not config.composition.get('anchor_queries', True)
      and not config.composition.recency_bias):
    raise ValueError('composition.anchor_queries=False needs '
                     'composition.recency_bias=True (without either, every '
                     'head averages all earlier positions); set it.')
  for i, split in enumerate(config.eval.splits):
    check_split(split, f'eval.splits[{i}]')
  if config.eval.during_training_split:
    check_split(config.eval.during_training_split,
                'eval.during_training_split')
  sharding.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
  from calm_jax import evaluation
  for split, metric in (config.eval.get('metrics', None) or {}).items():
    if split not in config.eval.splits:
      raise ValueError(
          f'eval.metrics.{split}: {split!r} is not one of eval.splits='
          f'{tuple(config.eval.splits)}; add it there or remove the entry.')
    evaluation.check_metric(metric, f'eval.metrics.{split}')
  full_ft_split = config.baselines.get('full_ft_split', '')
  if full_ft_split and 'full_ft' in config.rows:
    check_split(full_ft_split, 'baselines.full_ft_split')
  full_ft_steps = config.baselines.get('full_ft_steps', 0)
  if (not isinstance(full_ft_steps, int) or isinstance(full_ft_steps, bool)
      or full_ft_steps < 0):
    raise ValueError(
        f'baselines.full_ft_steps={full_ft_steps!r} must be an integer >= 0 '
        '(0 = train.steps). Set it to the full_ft row\'s number of steps.')


def check_model_name(name: str, field: str) -> None:
  """Models are chosen by module name in calm_jax.models, big_vision style."""
  from calm_jax import models
  if name not in models.LM_MODULES:
    raise ValueError(f'{field}={name!r} is not a model in calm_jax.models; '
                     f'choose one of {list(models.LM_MODULES)}.')


def make_mesh(config: ConfigDict, devices: Sequence[Any] | None = None):
  """The experiment's device mesh (`config.mesh`)."""
  from calm_jax import sharding
  return sharding.make_mesh(
      {'data': config.mesh.data, 'fsdp': config.mesh.fsdp,
       'tensor': config.mesh.tensor}, devices)
