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
# data.seq_len=0: the models' shortest context, at most this.
AUTO_SEQ_LEN = 1024


def parse_variant(arg: str | None, variants: Sequence[str]) -> str:
  """The variant named by `--config=FILE:VARIANT`; '' or None is the first."""
  variant = (arg or '').strip() or variants[0]
  if variant not in variants:
    raise ValueError(f'Unknown config variant {variant!r}; use one of '
                     f'{list(variants)}, e.g. --config=FILE:{variants[-1]}.')
  return variant


def data_config(dataset: str, **overrides: Any) -> ConfigDict:
  """Fields of `config.data` shared by every experiment.

  A dataset's own generator fields (`data.kv`, `data.code`, `data.ntl`) are
  added by its experiment.
  """
  c = ConfigDict()
  # A dataset in calm_jax.data: 'jsonl', 'text' or 'tfds' (your own data,
  # calm_jax/data/files.py), or a generated one ('kv_arithmetic',
  # 'code_corpus', 'ntl_catalogs').
  c.dataset = dataset
  # '' = the anchor checkpoint's tokenizer ('anchor') when the anchor is a
  # checkpoint, else 'byte'; or 'char', 'char:N', or a tokenizer directory.
  c.tokenizer = ''
  # Tokens per training row (BOS..EOS included); 0: the models' shortest
  # context, at most 1024.
  c.seq_len = 0
  # Where TFDS writes array_record files; '' means WORKDIR/tfds.
  c.data_dir = ''
  # Pack several short examples into each training row (segment ids keep
  # them apart); documents longer than a row are cut into rows.
  c.pack = False
  # Your own data (jsonl, text: files or globs, comma-separated; tfds:
  # split specs such as 'train[:95%]'); '' eval = a held-out fraction.
  c.train = ''
  c.eval = ''
  c.eval_fraction = 0.05
  c.split_seed = 0
  # Field names: `text` (language-model style) or `prompt` + `completion`
  # (loss on the completion only).
  c.text_key = 'text'
  c.prompt_key = 'prompt'
  c.completion_key = 'completion'
  # data.dataset='tfds': a registered dataset prepared in array_record
  # format, and its data directory ('' = TFDS's default).
  c.tfds_name = ''
  c.tfds_data_dir = ''
  c.update(overrides)
  return c


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
  # architecture pretrained on this split instead, or loaded from a path
  # (required when `checkpoint` is set: a checkpoint's m_A cannot be
  # pretrained here).
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
    return read_model_file(model_cfg.checkpoint, f'{field}.checkpoint')
  return transformer.DecoderConfig.from_dict(model_cfg.arch.to_dict(),
                                             f'{field}.arch')


def read_model_file(path: str, field: str) -> transformer.DecoderConfig:
  """Reads a model directory's architecture, failing clearly if absent.

  `field` names where the path came from (e.g. 'models.anchor.checkpoint').
  """
  path = os.fspath(path)
  meta = os.path.join(path, MODEL_FILE)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(
        f'{field}: no model directory at {path!r}. Point it at a directory '
        'written by calm_jax or a Hugging Face checkpoint (config.json and '
        '*.safetensors).')
  if is_hf_checkpoint(path):
    from calm_jax import hf_import  # Deferred: reads safetensors.
    return hf_import.read_config(path)[1]
  try:
    arch = json.loads(epath.Path(meta).read_text())['arch']
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
        f'{field}: {meta!r} is missing or corrupted ({e}). The directory is '
        'not a complete calm_jax model (nor a Hugging Face one: no '
        'config.json); re-export it, or point the field at a complete '
        'one.') from e
  return transformer.DecoderConfig.from_dict(arch, field)


def read_model_json(path: str) -> dict[str, Any]:
  """A calm_jax model directory's model.json ({} when unreadable)."""
  try:
    return json.loads((epath.Path(path) / MODEL_FILE).read_text())
  except (OSError, ValueError):
    return {}


def check_model_tokenizer(tok: Any, path: str, field: str) -> None:
  """Refuses a model whose own tokenizer is not `tok` (the data's).

  A Hugging Face checkpoint's tokenizer files, or the tokenizer a calm_jax
  model directory records, are compared by their token-to-id maps: equal
  sizes are not enough. A checkpoint without a tokenizer is refused, since
  nothing says which ids it reads.
  """
  from calm_jax.data import tokenizers  # Deferred: data pulls in TFDS.
  path = os.fspath(path)
  if is_hf_checkpoint(path):
    if not tokenizers.has_tokenizer(path):
      raise ValueError(
          f'{field}={path!r} holds no tokenizer (tokenizer.json or '
          'tokenizer.model), so nothing says which token ids it was trained '
          "on; copy its tokenizer's files into that directory.")
    own = tokenizers.checkpoint_tokenizer(path, field)
    diff = tokenizers.difference(tok, own)
    theirs = own.spec
  else:
    record = read_model_json(path).get('tokenizer')
    if record is None:
      # Written before models recorded their tokenizer; such models were
      # all trained on 'byte' or 'char' ids.
      if tok.spec in ('byte', 'char') or tok.spec.startswith('char:'):
        return
      raise ValueError(
          f'{field}={path!r} does not record its tokenizer (a model '
          'directory of an older calm_jax, trained on byte or char ids), '
          f'and data.tokenizer={tok.spec!r} is neither; set data.tokenizer '
          "to the one it was trained with, e.g. 'byte'.")
    theirs = record.get('spec', '?')
    diff = ('' if record.get('fingerprint') == tok.fingerprint else
            f'it was trained on {theirs!r}')
  if diff:
    raise ValueError(
        f'{field}={path!r} reads the ids of another tokenizer than '
        f'data.tokenizer={tok.spec!r} ({diff}). A model must be fed its '
        'own tokenizer\'s ids, and composed models must share one: set '
        f'data.tokenizer={theirs!r} (or \'anchor\'), and compose models '
        'trained with the same tokenizer.')


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


def resolve(config: ConfigDict) -> ConfigDict:
  """A copy of `config` with its derived fields made explicit.

  `data.tokenizer` becomes a name or an absolute path ('' and 'anchor'
  name the anchor checkpoint's tokenizer, or bytes when the anchor is
  pretrained here). Resolving a resolved config changes nothing.
  """
  from calm_jax.data import tokenizers  # Deferred: data pulls in TFDS.
  out = ConfigDict(config.to_dict())
  out.data.tokenizer = tokenizers.resolve_spec(
      out.data.get('tokenizer', ''), out.models.anchor.checkpoint)
  if out.data.get('seq_len', None) == 0:
    # The shortest context of the models, at most AUTO_SEQ_LEN.
    roles = [('models.anchor', out.models.anchor)] + [
        (f'models.augmenting.{n}', m)
        for n, m in out.models.augmenting.items()]
    contexts = [decoder_config(m, field).max_len for field, m in roles
                if m.checkpoint or m.arch]
    out.data.seq_len = min(contexts + [AUTO_SEQ_LEN])
  return out


def model_checkpoints(config: ConfigDict) -> list[tuple[str, str]]:
  """(field, path) of every model the config loads from a directory."""
  out = []
  if config.models.anchor.checkpoint:
    out.append(('models.anchor.checkpoint', config.models.anchor.checkpoint))
  for name, m in config.models.augmenting.items():
    if m.checkpoint:
      out.append((f'models.augmenting.{name}.checkpoint', m.checkpoint))
    if m.get('vanilla_checkpoint', '') and 'calm_vanilla_aug' in config.rows:
      out.append((f'models.augmenting.{name}.vanilla_checkpoint',
                  m.vanilla_checkpoint))
  return out


def cached_models(config: ConfigDict, workdir: str
                  ) -> list[tuple[str, str, ConfigDict]]:
  """(field, WORKDIR/models/<role>, model config) of every model this
  config pretrains in the workdir (and caches there)."""
  models = os.path.join(workdir, 'models')
  out = []
  if not config.models.anchor.checkpoint:
    out.append(('models.anchor', os.path.join(models, 'anchor'),
                config.models.anchor))
  for name, m in config.models.augmenting.items():
    field = f'models.augmenting.{name}'
    if not m.checkpoint:
      out.append((field, os.path.join(models, f'aug_{name}'), m))
    if ('calm_vanilla_aug' in config.rows and
        not m.get('vanilla_checkpoint', '')):
      out.append((field, os.path.join(models, f'vanilla_{name}'), m))
  return out


def check_workdir(config: ConfigDict, workdir: str) -> None:
  """Refuses models cached in `workdir` that this config would not make.

  A model pretrained by an earlier run is reused only if its architecture
  and tokenizer are this config's; otherwise reusing it would silently
  train on another model than the config describes.
  """
  from calm_jax.data import tokenizers  # Deferred: data pulls in TFDS.
  tok = tokenizers.get_tokenizer(config.data.tokenizer)
  for field, path, m in cached_models(config, workdir):
    if not (epath.Path(path) / MODEL_FILE).is_file():
      continue
    cached = read_model_file(path, f'{field} (cached in the workdir)')
    wanted = transformer.DecoderConfig.from_dict(m.arch.to_dict(),
                                                 f'{field}.arch')
    if cached != wanted:
      diff = sorted(k for k, v in wanted.to_dict().items()
                    if cached.to_dict()[k] != v)
      raise ValueError(
          f'{path} was pretrained by an earlier run with another '
          f'architecture than {field}.arch (they differ in {diff}); use a '
          'fresh --workdir, or delete that directory to pretrain anew.')
    try:
      check_model_tokenizer(tok, path, f'{field} (cached in the workdir)')
    except ValueError as e:
      raise ValueError(f'{e} Or use a fresh --workdir, or delete {path}.'
                       ) from None


def validate(config: ConfigDict, devices: Sequence[Any] | None = None
             ) -> None:
  """Checks a whole experiment config before any compute.

  `devices` (default: all) are what the mesh and batch sizes are checked
  against.
  """
  from calm_jax import data as data_lib  # Deferred: pulls in TFDS.
  from calm_jax import sharding  # Deferred: touches the backend.
  from calm_jax.data import tokenizers

  config = resolve(config)
  mesh = make_mesh(config, devices)
  # The model directories first: the default tokenizer is the anchor's.
  for field, path in model_checkpoints(config):
    read_model_file(path, field)
    if is_hf_checkpoint(path) and not tokenizers.has_tokenizer(path):
      raise ValueError(
          f'{field}={path!r} holds no tokenizer (tokenizer.json or '
          'tokenizer.model), so nothing says which token ids it was trained '
          "on; copy its tokenizer's files into that directory.")

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
  # One tokenizer feeds every model: each checkpoint must have been trained
  # on it (same token-to-id map), and each embedding table must hold its
  # ids (a table padded past the vocabulary is fine).
  for field, m in roles:
    if not m.checkpoint and not m.arch:
      raise ValueError(f'{field}.checkpoint is empty, and {field}.arch names '
                       'no architecture to pretrain; set '
                       f'{field}.checkpoint to a model directory.')
  tok = tokenizers.get_tokenizer(config.data.tokenizer)
  for field, path in model_checkpoints(config):
    check_model_tokenizer(tok, path, field)
  for field, m in roles:
    check_model_name(m.model, f'{field}.model')
    arch = decoder_config(m, field)
    where = f'{field}.checkpoint' if m.checkpoint else f'{field}.arch'
    if arch.vocab_size < tok.vocab_size:
      raise ValueError(
          f'{where}: the embedding table has {arch.vocab_size} rows, fewer '
          f'than the ids of data.tokenizer={tok.spec!r} ({tok.vocab_size}); '
          + (f'set {field}.arch.vocab_size to at least {tok.vocab_size}.'
             if not m.checkpoint else
             'use a checkpoint trained with this tokenizer.'))
    if arch.max_len < config.data.seq_len:
      raise ValueError(
          f'{where}: max_len={arch.max_len} is shorter than '
          f'data.seq_len={config.data.seq_len}; lower data.seq_len'
          + (' or raise max_len.' if not m.checkpoint else '.'))
    if not m.checkpoint:
      check_train(m.pretrain, f'{field}.pretrain')
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
      field = f'models.augmenting.{name}'
      if m.checkpoint and not m.vanilla_checkpoint:
        raise ValueError(
            f"rows has 'calm_vanilla_aug', which composes an m_A of "
            f'{field}.checkpoint\'s architecture trained without its '
            f'skill; a checkpoint\'s m_A is not pretrained here, so set '
            f'{field}.vanilla_checkpoint to such a model, or drop the row.')
      if not m.vanilla_checkpoint:
        check_split(m.vanilla_split, f'{field}.vanilla_split')
      else:
        vanilla = read_model_file(m.vanilla_checkpoint,
                                  f'{field}.vanilla_checkpoint')
        composition_lib.validate_pairs(
            augmenting_models(config)[list(config.models.augmenting).index(
                name)].pairs, vanilla.num_layers, decoder_config(
                    config.models.anchor, 'models.anchor').num_layers,
            f'{field}.vanilla_checkpoint (its layers, with the pairs of '
            f'{field})')
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
  if config.composition.cache_augmenting and config.data.get('pack', False):
    raise ValueError('composition.cache_augmenting=True stores m_A\'s states '
                     'per example, which packed rows do not keep; set '
                     'data.pack=False or composition.cache_augmenting=False.')
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
  evaluation.check_sampling(config.eval.get('sampling', None))
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
