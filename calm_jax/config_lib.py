"""Experiment config building blocks and the up-front validation pass.

Experiments (`experiments/*.py`) assemble their config from the helpers here
so every experiment has the same fields. `validate` runs before any data is
built or any model is compiled, and fails with a message that names the
offending field and the fix.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import ml_collections

from calm_jax import checkpoints
from calm_jax.data import tokenizers
from calm_jax.models import attention as attention_lib
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

ConfigDict = ml_collections.ConfigDict
# data.seq_len=0: the models' shortest context, at most this.
AUTO_SEQ_LEN = 1024
# The pretraining settings that change what a model learns (a cached model
# is reused only if they match).
PRETRAIN_FIELDS = ('split', 'steps', 'batch_size', 'seq_len', 'learning_rate',
                   'warmup_steps', 'min_lr_ratio', 'weight_decay', 'b1', 'b2',
                   'grad_clip', 'seed')


def parse_variant(arg: str | None, variants: Sequence[str]) -> str:
  """The variant named by `--config=FILE:VARIANT`; '' or None is the first."""
  variant = (arg or '').strip() or variants[0]
  if variant not in variants:
    raise ValueError(f'Unknown config variant {variant!r}; use one of '
                     f'{list(variants)}, e.g. --config=FILE:{variants[-1]}.')
  return variant


def base_config() -> ConfigDict:
  """The top-level fields every experiment starts from (seed and runtime)."""
  c = ConfigDict()
  # Seed of the models pretrained here and of calm_random_aug's random m_A.
  # Trained rows (the bridges' init and data order) run once per `seeds`.
  c.seed = 0
  # Dtype the frozen models are held and computed in: 'auto' is bfloat16
  # on TPU/GPU (half the memory), float32 on CPU; the composition and the
  # loss stay float32.
  c.frozen_dtype = 'auto'
  # Recompute block activations in the backward pass (less memory).
  c.remat = False
  # Self-attention kernel: 'auto' (splash on TPU, cuDNN on GPU, XLA on CPU),
  # or 'xla', 'cudnn', 'splash' (calm_jax/models/attention.py).
  c.attention = 'auto'
  return c


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
  # Augmenting tokens per row when composition.align='chars' (each
  # augmenting model reads its own stream); 0: data.seq_len.
  c.aug_seq_len = 0
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
  # Steps traced with jax.profiler into RUN_DIR/profile after 10 warm-up
  # steps, with the compiled step's HLO (0: none); summarise them with
  # `python -m calm_jax.profiling --trace_dir=RUN_DIR/profile`.
  c.profile_steps = 0
  c.update(overrides)
  return c


def model_config(arch: dict[str, Any], pretrain: ConfigDict,
                 every_k: int = 4) -> ConfigDict:
  """One model: its architecture, where it comes from, how it composes."""
  c = ConfigDict()
  # A checkpoint directory: Hugging Face (config.json + *.safetensors) or
  # calm_jax's own (checkpoints.save_model); '' means pretrain it with
  # `pretrain` and cache it in the workdir.
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
  # Augmenting models only: the tokenizer it reads. '' = its checkpoint's
  # own (tokenizer files, or the one its model.json records) when it has
  # one, else data.tokenizer; or a name ('byte', 'char:N') or a tokenizer
  # directory. Another tokenizer than data.tokenizer (the anchor's) needs
  # composition.align='chars' ('auto' chooses it).
  c.tokenizer = ''
  return c


def composition_config(**overrides: Any) -> ConfigDict:
  """The trainable bridges (see calm_jax/models/composition.py)."""
  c = ConfigDict()
  # Which bridge joins each layer pair: 'paper' (composition.PaperBridge),
  # or 'ours' (models/bridges.py), whose options are `ours` below.
  c.bridge = 'paper'
  # Cross-attention heads; 0 means the anchor's head count (the paper's).
  c.cross_heads = 0
  # Ablation: the augmenting model reads the prompt only.
  c.prompt_only = False
  # Options of bridge 'ours' (read only when bridge='ours'): recency_bias,
  # recency_max_slope, anchor_queries, proj_hidden, gate, source_gate,
  # anchor_gate.
  c.ours = ConfigDict(composition_lib.bridge_defaults('ours'))
  # Ours (0: the paper): adds weight x the mean over tokens of the squared
  # norm of what the bridges write into the anchor's stream to the loss.
  c.write_penalty = 0.0
  # Compute m_A's states on D_C once, store them in WORKDIR/aug_cache and
  # read them every step instead of running m_A.
  c.cache_augmenting = False
  # 'none': every model reads the anchor's token ids (one tokenizer);
  # 'chars': each augmenting model reads the text in its own tokenizer and
  # the anchor reads its tokens once their characters are read
  # (calm_jax/data/align.py); 'auto': 'chars' when some augmenting model's
  # tokenizer is not data.tokenizer, else 'none'.
  c.align = 'auto'
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
    return checkpoints.read_model_file(model_cfg.checkpoint,
                                       f'{field}.checkpoint')
  return transformer.DecoderConfig.from_dict(model_cfg.arch.to_dict(),
                                             f'{field}.arch')


def augmenting_models(config: ConfigDict
                      ) -> tuple[composition_lib.Augmenting, ...]:
  """The augmenting models with their layer pairs (validated)."""
  anchor = decoder_config(config.models.anchor, 'models.anchor')
  out = []
  for name, m in config.models.augmenting.items():
    field = f'models.augmenting.{name}'
    arch = decoder_config(m, field)
    if m.pairs:
      if not all(isinstance(p, (tuple, list)) for p in m.pairs):
        raise ValueError(
            f'{field}.pairs={tuple(m.pairs)!r} must be a tuple of '
            '(aug_layer, anchor_layer) pairs, e.g. ((1, 1), (3, 3)).')
      pairs = composition_lib.validate_pairs(
          m.pairs, arch.num_layers, anchor.num_layers, f'{field}.pairs')
    else:
      pairs = composition_lib.select_pairs(
          arch.num_layers, anchor.num_layers, m.every_k, field)
    out.append(composition_lib.Augmenting(name, arch, pairs))
  return tuple(out)


def bridge_config(c: ConfigDict) -> composition_lib.BridgeConfig:
  """The validated bridge of `config.composition`.

  A bridge's options are read from `composition.<bridge>` (e.g.
  `composition.ours`); options of another bridge must keep their defaults.
  """
  for name in composition_lib.BRIDGES:
    if name != c.bridge and name in c:
      defaults = composition_lib.bridge_defaults(name)
      changed = sorted(k for k, v in c[name].items() if defaults.get(k) != v)
      if changed:
        raise ValueError(
            f'composition.{name}.{changed[0]}={c[name][changed[0]]!r} is read '
            f"only by composition.bridge={name!r}, not by {c.bridge!r}; set "
            f"composition.bridge={name!r}, or leave it at its default.")
  options = c[c.bridge].to_dict() if c.bridge in c else {}
  return composition_lib.BridgeConfig.make(
      c.bridge, c.cross_heads, options, f'composition.{c.bridge}')


def check_model_tokenizer(tok: Any, path: str, field: str,
                          tok_field: str = 'data.tokenizer') -> None:
  """Refuses a model whose own tokenizer is not `tok` (set by `tok_field`:
  the data's, or an augmenting model's own).

  A Hugging Face checkpoint's tokenizer files, or the tokenizer a calm_jax
  model directory records, are compared by their token-to-id maps: equal
  sizes are not enough. A checkpoint without a tokenizer is refused, since
  nothing says which ids it reads.
  """
  path = os.fspath(path)
  if checkpoints.is_hf_checkpoint(path):
    check_has_tokenizer(path, field)
    own = tokenizers.checkpoint_tokenizer(path, field)
    diff = tokenizers.difference(tok, own)
    theirs = own.spec
  else:
    record = checkpoints.read_model_json(path).get('tokenizer')
    if record is None:
      # Written before models recorded their tokenizer; such models were
      # all trained on 'byte' or 'char' ids.
      if tok.spec in ('byte', 'char') or tok.spec.startswith('char:'):
        return
      raise ValueError(
          f'{field}={path!r} does not record its tokenizer (a model '
          'directory of an older calm_jax, trained on byte or char ids), '
          f'and {tok_field}={tok.spec!r} is neither; set {tok_field} '
          "to the one it was trained with, e.g. 'byte'.")
    theirs = record.get('spec', '?')
    diff = ('' if record.get('fingerprint') == tok.fingerprint else
            f'it was trained on {theirs!r}')
  if diff and tok_field != 'data.tokenizer':
    raise ValueError(
        f'{field}={path!r} reads the ids of another tokenizer than '
        f'{tok_field}={tok.spec!r} ({diff}). A model must be fed its own '
        f"tokenizer's ids: set {tok_field}={theirs!r}, or '' (its own).")
  if diff:
    raise ValueError(
        f'{field}={path!r} reads the ids of another tokenizer than '
        f'data.tokenizer={tok.spec!r} ({diff}). A model must be fed its '
        "own tokenizer's ids, and composed models must share one: set "
        f"data.tokenizer={theirs!r} (or 'anchor'), and compose models "
        'trained with the same tokenizer.')


def aug_tokenizer_spec(config: ConfigDict, name: str) -> str:
  """`models.augmenting.<name>.tokenizer` resolved: a name or a path.

  '' is the model checkpoint's own tokenizer when it has or records one,
  else `data.tokenizer`.
  """
  m = config.models.augmenting[name]
  spec = (m.get('tokenizer', '') or '').strip()
  if spec:
    return tokenizers.resolve_spec(spec)
  if m.checkpoint and os.path.isdir(m.checkpoint):
    if tokenizers.has_tokenizer(m.checkpoint):
      return os.path.abspath(m.checkpoint)
    recorded = (checkpoints.read_model_json(m.checkpoint).get('tokenizer')
                or {})
    if isinstance(recorded, dict) and recorded.get('spec'):
      return recorded['spec']
  return config.data.tokenizer


def aug_tokenizers(config: ConfigDict) -> dict[str, Any]:
  """{name: tokenizer} of every augmenting model (a resolved config)."""
  return {name: tokenizers.get_tokenizer(
      m.get('tokenizer', '') or config.data.tokenizer,
      field=f'models.augmenting.{name}.tokenizer')
          for name, m in config.models.augmenting.items()}


def aligned_tokenizers(config: ConfigDict) -> dict[str, Any] | None:
  """The augmenting tokenizers when the composition aligns streams
  (composition.align='chars', resolved), else None."""
  if config.composition.get('align', 'none') != 'chars':
    return None
  return aug_tokenizers(config)


def check_has_tokenizer(path: str, field: str) -> None:
  """A Hugging Face checkpoint must hold the tokenizer it was trained on."""
  if checkpoints.is_hf_checkpoint(path) and not tokenizers.has_tokenizer(
      path):
    raise ValueError(
        f'{field}={path!r} holds no tokenizer (tokenizer.json or '
        'tokenizer.model), so nothing says which token ids it was trained '
        "on; copy its tokenizer's files into that directory.")


def model_checkpoints(config: ConfigDict) -> list[tuple[str, str]]:
  """(field, path) of every model the config loads from a directory."""
  out = []
  if config.models.anchor.checkpoint:
    out.append(('models.anchor.checkpoint', config.models.anchor.checkpoint))
  for name, m in config.models.augmenting.items():
    if m.checkpoint:
      out.append((f'models.augmenting.{name}.checkpoint', m.checkpoint))
    if m.vanilla_checkpoint and 'calm_vanilla_aug' in config.rows:
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
    if 'calm_vanilla_aug' in config.rows and not m.vanilla_checkpoint:
      vanilla = ConfigDict(m.to_dict())  # What rows.calm_vanilla_aug makes.
      vanilla.pretrain.split = m.vanilla_split
      out.append((field, os.path.join(models, f'vanilla_{name}'), vanilla))
  return out


def check_workdir(config: ConfigDict, workdir: str) -> None:
  """Refuses models cached in `workdir` that this config would not make.

  A model pretrained by an earlier run is reused only if its architecture
  and tokenizer are this config's; otherwise reusing it would silently
  train on another model than the config describes.
  """
  data_tok = tokenizers.get_tokenizer(config.data.tokenizer)
  augs = aug_tokenizers(config)
  for field, path, m in cached_models(config, workdir):
    if not checkpoints.model_exists(path):
      continue
    tok = augs.get(field.rsplit('.', 1)[-1], data_tok) if (
        field.startswith('models.augmenting.')) else data_tok
    cached = checkpoints.read_model_file(path,
                                         f'{field} (cached in the workdir)')
    wanted = transformer.DecoderConfig.from_dict(m.arch.to_dict(),
                                                 f'{field}.arch')
    if cached != wanted:
      have = cached.to_dict()
      diff = ', '.join(f'{field}.arch.{k}={v!r} against {have[k]!r}'
                       for k, v in sorted(wanted.to_dict().items())
                       if have[k] != v)
      raise ValueError(
          f'{field}.arch: {path} was pretrained by an earlier run with '
          f'another architecture ({diff} cached); use a fresh --workdir, or '
          'delete that directory to pretrain anew.')
    # What made it: the pretraining settings that change the model (runs
    # saved before models recorded them are checked by architecture only).
    meta = checkpoints.read_model_json(path)
    made = dict(meta.get('pretrain') or {}, seed=meta.get('seed'))
    want = dict(m.pretrain.to_dict(), seed=config.seed)
    if meta.get('pretrain') is not None:
      diff = [k for k in PRETRAIN_FIELDS if made.get(k) != want.get(k)]
      if diff:
        k = diff[0]
        name = 'seed' if k == 'seed' else f'{field}.pretrain.{k}'
        raise ValueError(
            f'{name}: {path} was pretrained by an earlier run with '
            f'{name}='
            f'{made.get(k)!r}, and this config has {want.get(k)!r}; use a '
            'fresh --workdir, or delete that directory to pretrain anew.')
    try:
      check_model_tokenizer(tok, path, f'{field} (cached in the workdir)',
                            'data.tokenizer' if tok is data_tok
                            else f'{field}.tokenizer')
    except ValueError as e:
      raise ValueError(f'{e} Or use a fresh --workdir, or delete {path}.'
                       ) from None


# -------------------------------------------------------------- validation
#
# Each section of a config is checked by its own function; `train.validate`
# calls them in turn, before any compute.


def frozen_dtype_for(platform: str) -> str:
  """`frozen_dtype='auto'`: the frozen models' dtype on this platform.

  bfloat16 halves their memory and runs their matmuls at the accelerator's
  bf16 rate; the bridges, their optimizer state and the loss stay float32.
  CPUs keep float32 (their bf16 matmuls are no faster).
  """
  return 'bfloat16' if platform in ('tpu', 'gpu') else 'float32'


def resolve(config: ConfigDict) -> ConfigDict:
  """A copy of `config` with its derived fields made explicit.

  `data.tokenizer` becomes a name or an absolute path ('' and 'anchor'
  name the anchor checkpoint's tokenizer, or bytes when the anchor is
  pretrained here); `data.seq_len` 0 becomes the models' shortest context,
  at most AUTO_SEQ_LEN; `frozen_dtype='auto'` becomes bfloat16 on TPUs and
  GPUs, float32 on CPUs. Resolving a resolved config changes nothing.
  """
  out = ConfigDict(config.to_dict())
  if out.get('frozen_dtype', None) == 'auto':
    out.frozen_dtype = frozen_dtype_for(jax.default_backend())
  out.data.tokenizer = tokenizers.resolve_spec(
      out.data.get('tokenizer', ''), out.models.anchor.checkpoint)
  # Each augmenting model's tokenizer, and whether the streams align.
  differ = False
  for name, m in out.models.augmenting.items():
    if 'tokenizer' not in m:
      continue
    m.tokenizer = aug_tokenizer_spec(out, name)
    if m.tokenizer != out.data.tokenizer:
      try:
        differ |= (tokenizers.get_tokenizer(m.tokenizer).fingerprint !=
                   tokenizers.get_tokenizer(out.data.tokenizer).fingerprint)
      except ValueError:
        differ = True  # Validation names the field.
  if out.composition.get('align', None) == 'auto':
    out.composition.align = 'chars' if differ else 'none'
  if out.data.get('seq_len', None) == 0:
    roles = [('models.anchor', out.models.anchor)] + [
        (f'models.augmenting.{n}', m)
        for n, m in out.models.augmenting.items()]
    contexts = [decoder_config(m, field).max_len for field, m in roles
                if m.checkpoint or m.arch]
    out.data.seq_len = min(contexts + [AUTO_SEQ_LEN])
  return out


SplitCheck = Callable[[str, str], None]


def split_check(splits: Sequence[str], dataset: str) -> SplitCheck:
  """check(split, field): refuses a split the dataset does not have."""
  def check(split: str, field: str) -> None:
    if split not in splits:
      raise ValueError(f'{field}={split!r} is not a split of dataset '
                       f'{dataset!r}; choose one of {list(splits)}.')
  return check


def check_model_dirs(config: ConfigDict) -> None:
  """Every model directory exists and says which tokenizer it reads.

  Checked before the data: the default tokenizer is the anchor's.
  """
  roles = [('models.anchor', config.models.anchor)] + [
      (f'models.augmenting.{n}', m) for n, m in config.models.augmenting.items()]
  for field, m in roles:
    if not m.checkpoint and not m.arch:
      raise ValueError(f'{field}.checkpoint is empty, and {field}.arch names '
                       'no architecture to pretrain; set '
                       f'{field}.checkpoint to a model directory.')
  for field, path in model_checkpoints(config):
    checkpoints.read_model_file(path, field)
    check_has_tokenizer(path, field)


def validate_train(t: ConfigDict, field: str, check_split: SplitCheck,
                   seq_len: int, check_batch: Callable[[int, str], None]
                   ) -> None:
  """One training run's fields (`train`, or a model's `pretrain`)."""
  check_split(t.split, f'{field}.split')
  for name in ('steps', 'batch_size'):
    if not isinstance(t[name], int) or t[name] <= 0:
      raise ValueError(f'{field}.{name} must be a positive int, got '
                       f'{t[name]!r}.')
  if not t.learning_rate > 0:
    raise ValueError(f'{field}.learning_rate must be positive.')
  for name, least, meaning in (
      ('log_every', 1, ''), ('eval_every', 0, ' (0: only at the end)'),
      ('checkpoint_every', 1, ' (the last step is always saved)'),
      ('keep_checkpoints', 1, ''), ('profile_steps', 0, ' (0: no trace)')):
    value = t.get(name, least)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ValueError(f'{field}.{name}={value!r} must be an int >= {least}'
                       f'{meaning}.')
  row_len = t.get('seq_len', 0)
  if (not isinstance(row_len, int) or row_len == 1 or
      not 0 <= row_len <= seq_len):
    raise ValueError(
        f'{field}.seq_len={row_len!r} must be 0 (use data.seq_len) or an '
        f'int in [2, data.seq_len={seq_len}].')
  check_batch(t.batch_size, f'{field}.batch_size')


def validate_models(config: ConfigDict, check_split: SplitCheck,
                    check_batch: Callable[[int, str], None]) -> None:
  """`config.models` against the data's tokenizer and sequence length.

  One tokenizer feeds every model: each checkpoint must have been trained
  on it (same token-to-id map), and each embedding table must hold its ids
  (a table padded past the vocabulary is fine).
  """
  if not config.models.augmenting:
    raise ValueError('models.augmenting is empty; CALM needs at least one '
                     'augmenting model.')
  roles = [('models.anchor', config.models.anchor)] + [
      (f'models.augmenting.{n}', m) for n, m in config.models.augmenting.items()]
  data_tok = tokenizers.get_tokenizer(config.data.tokenizer)
  toks = {'models.anchor': data_tok}
  toks.update({f'models.augmenting.{name}': tok
               for name, tok in aug_tokenizers(config).items()})
  align = config.composition.get('align', 'none')
  for field, tok in toks.items():
    if tok.fingerprint != data_tok.fingerprint and align != 'chars':
      raise ValueError(
          f'{field}.tokenizer={tok.spec!r} is not data.tokenizer='
          f'{data_tok.spec!r} (the anchor\'s; '
          f'{tokenizers.difference(data_tok, tok)}), and '
          f'composition.align={align!r} feeds every model the anchor\'s ids; '
          "set composition.align='chars' (each model reads the text in its "
          'own tokenizer, aligned by characters).')
  for field, path in model_checkpoints(config):
    role = field.rsplit('.', 1)[0]
    tok = toks.get(role, data_tok)
    check_model_tokenizer(tok, path, field, 'data.tokenizer' if (
        tok is data_tok) else f'{role}.tokenizer')
  seq_len = config.data.seq_len
  for field, m in roles:
    tok = toks[field]
    what = ('data.tokenizer' if tok is data_tok else f'{field}.tokenizer')
    arch = decoder_config(m, field)
    where = f'{field}.checkpoint' if m.checkpoint else f'{field}.arch'
    if arch.vocab_size < tok.vocab_size:
      raise ValueError(
          f'{where}: the embedding table has {arch.vocab_size} rows, fewer '
          f'than the ids of {what}={tok.spec!r} ({tok.vocab_size}); '
          + (f'set {field}.arch.vocab_size to at least {tok.vocab_size}.'
             if not m.checkpoint else
             'use a checkpoint trained with this tokenizer.'))
    if arch.max_len < seq_len:
      raise ValueError(
          f'{where}: max_len={arch.max_len} is shorter than '
          f'data.seq_len={seq_len}; lower data.seq_len'
          + (' or raise max_len.' if not m.checkpoint else '.'))
    if not m.checkpoint:
      validate_train(m.pretrain, f'{field}.pretrain', check_split, seq_len,
                     check_batch)
  augmenting = augmenting_models(config)  # Layer pairs.
  if 'calm_vanilla_aug' in config.rows:
    anchor_layers = decoder_config(config.models.anchor,
                                   'models.anchor').num_layers
    for a, (name, m) in zip(augmenting, config.models.augmenting.items()):
      field = f'models.augmenting.{name}'
      if m.vanilla_checkpoint:
        vanilla = checkpoints.read_model_file(m.vanilla_checkpoint,
                                              f'{field}.vanilla_checkpoint')
        composition_lib.validate_pairs(
            a.pairs, vanilla.num_layers, anchor_layers,
            f'{field}.vanilla_checkpoint (its layers, with the pairs of '
            f'{field})')
      elif not m.checkpoint:
        check_split(m.vanilla_split, f'{field}.vanilla_split')
  if config.frozen_dtype not in transformer.DTYPES:
    raise ValueError(f'frozen_dtype={config.frozen_dtype!r} is not one of '
                     f"{sorted(transformer.DTYPES) + ['auto']}.")
  attention_lib.check_name(config.get('attention', 'auto'))


def validate_composition(config: ConfigDict) -> None:
  """`config.composition`: the bridge and its training options."""
  c = config.composition
  bridge_config(c)
  penalty = c.write_penalty
  if not isinstance(penalty, (int, float)) or not penalty >= 0:
    raise ValueError(f'composition.write_penalty={penalty!r} must be a '
                     'number >= 0 (0: no penalty, the paper).')
  align = c.get('align', 'none')
  if align not in ('none', 'chars'):
    raise ValueError(f"composition.align={align!r} must be 'auto', 'none' "
                     "or 'chars'.")
  if align == 'chars':
    if c.cache_augmenting:
      raise ValueError(
          "composition.cache_augmenting=True stores m_A's states per anchor "
          "token; with composition.align='chars' m_A reads its own stream. "
          'Set composition.cache_augmenting=False.')
    if c.bridge == 'ours' and c.ours.recency_bias:
      raise ValueError(
          'composition.ours.recency_bias measures distances in one token '
          "stream; composition.align='chars' has two. Set "
          'composition.ours.recency_bias=False.')
  if c.cache_augmenting and config.data.get('pack', False):
    raise ValueError("composition.cache_augmenting=True stores m_A's states "
                     'per example, which packed rows do not keep; set '
                     'data.pack=False or composition.cache_augmenting=False.')


def validate_baselines(config: ConfigDict, check_split: SplitCheck) -> None:
  b = config.baselines
  if b.full_ft_split and 'full_ft' in config.rows:
    check_split(b.full_ft_split, 'baselines.full_ft_split')
  if (not isinstance(b.full_ft_steps, int) or isinstance(b.full_ft_steps, bool)
      or b.full_ft_steps < 0):
    raise ValueError(
        f'baselines.full_ft_steps={b.full_ft_steps!r} must be an integer >= 0 '
        "(0 = train.steps). Set it to the full_ft row's number of steps.")
  if not config.seeds:
    raise ValueError('seeds is empty; give at least one, e.g. (0,).')


def make_mesh(config: ConfigDict, devices: Sequence[Any] | None = None):
  """The experiment's device mesh (`config.mesh`)."""
  from calm_jax import sharding  # Deferred: touches the backend.
  return sharding.make_mesh(
      {'data': config.mesh.data, 'fsdp': config.mesh.fsdp,
       'tensor': config.mesh.tensor}, devices)
