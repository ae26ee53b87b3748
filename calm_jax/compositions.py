"""Self-describing compositions: `composition.json` beside a run's checkpoints.

Every composed training run (`WORKDIR/runs/<row>/seed_<s>/`) writes, before
it trains, a small JSON file that says everything needed to use what it
trains:

  pairs       per augmenting model, its (augmenting layer, anchor layer)s;
  bridge      the bridge by name, its heads and options, and `prompt_only`;
  models      each frozen model's directory (absolute, and relative to the
              run) and a fingerprint of its config and weights index, or
              the seed of a randomly initialised stand-in;
  tokenizer   the spec and fingerprint of the tokenizer it reads (the
              anchor's); with `align` 'chars', each augmenting model's
              entry records its own `tokenizer` too.

`load` rebuilds `(model, params, tokenizer)` from the file alone; models or
a tokenizer given explicitly replace the recorded ones only if their
fingerprints match.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import struct
from typing import Any, Mapping

from etils import epath
import flax.linen as nn
import jax

from calm_jax import checkpoints
from calm_jax import paths
from calm_jax.data import tokenizers
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

FILE = 'composition.json'
FORMAT = 'calm_jax.composition/v1'
# Bytes of each weights file's data, from its start and its end, that the
# fingerprint reads (beside the index): a retrained model of the same shapes
# differs there.
_SAMPLE_BYTES = 1 << 20


# ------------------------------------------------------------ fingerprints


def _update_file(h: Any, path: str) -> None:
  with open(path, 'rb') as f:
    h.update(f.read())


def _update_safetensors(h: Any, path: str) -> None:
  """The header (every tensor's name, dtype, shape and offsets), the size
  and samples of the data of one safetensors file."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    h.update(f.read(n))
    start = 8 + n
    f.seek(start)
    h.update(f.read(_SAMPLE_BYTES))
    f.seek(max(start, size - _SAMPLE_BYTES))
    h.update(f.read(_SAMPLE_BYTES))
  h.update(str(size).encode())


def model_fingerprint(path: str) -> str:
  """A hash of a model directory's config and weights index.

  calm_jax directories: model.json (which holds a unique id per save) and
  Orbax's metadata; Hugging Face ones: config.json and each safetensors
  file's header, size and first and last MiB.
  """
  path = os.fspath(path)
  h = hashlib.sha256()
  ours = os.path.join(path, 'model.json')
  if os.path.exists(ours):
    _update_file(h, ours)
    meta = os.path.join(path, 'params', '_METADATA')
    if os.path.exists(meta):
      _update_file(h, meta)
    return h.hexdigest()[:16]
  config = os.path.join(path, 'config.json')
  if not os.path.exists(config):
    raise ValueError(f'{path} is not a model directory (no model.json or '
                     'config.json).')
  _update_file(h, config)
  for name in sorted(os.listdir(path)):
    if name.endswith('.safetensors'):
      h.update(name.encode())
      _update_safetensors(h, os.path.join(path, name))
  return h.hexdigest()[:16]


# ------------------------------------------------------------------ write


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """Where a frozen model of a composition comes from."""
  path: str = ''  # A model directory; '' for a random stand-in.
  random_seed: int | None = None  # Seed of a randomly initialised model.
  arch: Mapping[str, Any] | None = None  # Its architecture (random only).


def _ref_json(ref: ModelRef, run_dir: str) -> dict[str, Any]:
  if ref.path:
    path = os.path.abspath(ref.path)
    return {'path': path, 'relpath': os.path.relpath(path, run_dir),
            'fingerprint': model_fingerprint(path)}
  return {'random_seed': ref.random_seed, 'arch': dict(ref.arch or {})}


def write(run_dir: str, *, row: str, seed: int, model: Any,
          refs: Mapping[str, ModelRef], tokenizer: Any,
          frozen_dtype: str = 'float32',
          aug_tokenizers: Mapping[str, Any] | None = None) -> str:
  """Writes `run_dir/composition.json` for a `ComposedLM` being trained.

  `refs` maps 'anchor' and 'aug_<name>' to where each frozen model comes
  from. Returns the file's path.
  """
  run_dir = paths.absolute(run_dir)
  epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
  bridge = model.bridge.to_dict()
  bridge['cross_heads'] = bridge['cross_heads'] or model.anchor.num_heads
  info = {
      'format': FORMAT,
      'row': row,
      'seed': seed,
      'checkpoints': 'checkpoints',
      'anchor': _ref_json(refs['anchor'], run_dir),
      'augmenting': [
          dict(name=a.name, pairs=[list(p) for p in a.pairs],
               **_ref_json(refs[f'aug_{a.name}'], run_dir),
               **({'tokenizer': tokenizers.record(aug_tokenizers[a.name])}
                  if aug_tokenizers else {}))
          for a in model.augmenting],
      'align': model.align,
      'bridge': bridge,
      'prompt_only': bool(model.prompt_only),
      'tokenizer': tokenizers.record(tokenizer),
      'frozen_dtype': frozen_dtype,
      # The anchor's context as trained (also the decode caches' length).
      'max_len': model.anchor.max_len,
  }
  path = os.path.join(run_dir, FILE)
  paths.atomic_write_text(path, json.dumps(info, indent=2))
  return path


# ------------------------------------------------------------------- read


def find(path: str) -> str | None:
  """The composition file of a run directory (or of its checkpoints/)."""
  path = os.path.abspath(os.fspath(path))
  for candidate in (path, os.path.dirname(path)):
    if os.path.isfile(os.path.join(candidate, FILE)):
      return os.path.join(candidate, FILE)
  return None


def runs_below(path: str, limit: int = 6) -> list[str]:
  """Run directories under `path` (a workdir or a row's directory), at most
  `limit`, sorted: where a user who gave the directory above one meant to
  point."""
  path = os.path.abspath(os.fspath(path))
  found = []
  for pattern in ('*', os.path.join('*', '*'), os.path.join('runs', '*', '*')):
    found += [os.path.dirname(f) for f in glob.glob(
        os.path.join(path, pattern, FILE))]
  return sorted(set(found))[:limit]


def not_found(path: str) -> str:
  """Why `path` is no run directory, and which ones lie below it."""
  below = runs_below(path)
  hint = (f'the runs below it: {", ".join(below)}' if below else
          'give a run directory, e.g. WORKDIR/runs/calm/seed_0')
  return f'{path!r} holds no {FILE}; {hint}.'


def read(path: str) -> dict[str, Any]:
  """The parsed composition file of a run directory."""
  file = find(path)
  if file is None:
    raise ValueError(not_found(path))
  try:
    info = json.loads(epath.Path(file).read_text())
  except ValueError as e:
    raise ValueError(f'{file} is not valid JSON ({e}).') from e
  if info.get('format') != FORMAT:
    raise ValueError(f'{file}: format {info.get("format")!r} is not '
                     f'{FORMAT!r}.')
  info['_dir'] = os.path.dirname(file)
  return info


def recorded_path(entry: Mapping[str, Any], run_dir: str) -> str:
  """A recorded model's directory: beside the run if it moved with it."""
  rel = os.path.normpath(os.path.join(run_dir, entry.get('relpath', '')))
  if entry.get('relpath') and os.path.isdir(rel):
    return rel
  return entry['path']


def _check_model(given: str, entry: Mapping[str, Any], what: str,
                 flag: str) -> str:
  if 'fingerprint' not in entry:
    raise ValueError(f'{flag}: the composition\'s {what} is a random '
                     'stand-in, not a model directory; it cannot be '
                     'replaced.')
  if not os.path.isdir(given):
    raise ValueError(f'{flag}={given!r} is not a directory.')
  found = model_fingerprint(given)
  if found != entry['fingerprint']:
    raise ValueError(
        f'{flag}={given!r} is not the {what} this composition was trained '
        f'with (fingerprint {found}, recorded {entry["fingerprint"]} for '
        f'{entry["path"]}); drop the flag to use the recorded model.')
  return given


def load(path: str, *, anchor: str | None = None,
         augmenting: Mapping[str, str] | None = None,
         tokenizer: str | None = None, step: int | None = None,
         dtype: str | None = None) -> tuple[Any, Any, Any, dict[str, Any]]:
  """(model, params, tokenizer, info) of a trained composition.

  `path` is a run directory (or its checkpoints/ folder). `anchor`,
  `augmenting` ({name: directory}) and `tokenizer` replace the recorded
  ones, and must have their recorded fingerprints. `step` defaults to the
  latest checkpoint; `dtype` to the one it was trained with.
  """

  info = read(path)
  run_dir = info['_dir']
  dtype = dtype or info.get('frozen_dtype', 'float32')
  augmenting = dict(augmenting or {})
  names = [a['name'] for a in info['augmenting']]
  unknown = sorted(set(augmenting) - set(names))
  if unknown:
    raise ValueError(f'--augmenting names {unknown}, but the composition '
                     f'has {names}.')

  tok_info = info['tokenizer']
  if tokenizer:
    tok = tokenizers.get_tokenizer(tokenizer)
    if tok.fingerprint != tok_info['fingerprint']:
      raise ValueError(
          f'--tokenizer={tokenizer!r} is not the tokenizer this composition '
          f'was trained with ({tok_info["spec"]!r}); drop the flag.')
  else:
    spec = tok_info['spec']
    try:
      tok = tokenizers.get_tokenizer(spec)
    except ValueError as e:
      raise ValueError(f'{FILE}: the recorded tokenizer {spec!r} cannot be '
                       f'loaded ({e}); give --tokenizer.') from e
    if tok.fingerprint != tok_info['fingerprint']:
      raise ValueError(f'{FILE}: the tokenizer at {spec!r} has changed since '
                       'the composition was trained; give --tokenizer.')

  def frozen(entry, given, what, flag):
    if 'random_seed' in entry:
      arch = transformer.DecoderConfig.from_dict(entry['arch'], what)
      model = transformer.Decoder(arch)
      params = jax.jit(lambda r: nn.meta.unbox(model.init(
          r, jax.numpy.zeros((1, 8), jax.numpy.int32))['params']))(
              jax.random.key(entry['random_seed']))
    else:
      where = (_check_model(given, entry, what, flag) if given
               else recorded_path(entry, run_dir))
      arch, params = checkpoints.load_model(where, flag,
                                            max_len=info.get('max_len'))
    return transformer.cast(arch, params, dtype)

  aug_toks = {}
  for entry in info['augmenting']:
    if 'tokenizer' in entry:
      aug_toks[entry['name']] = _recorded_tokenizer(
          entry['tokenizer'], f"augmenting model {entry['name']!r}")
  if aug_toks:
    info['aug_tokenizers'] = aug_toks

  anchor_cfg, anchor_params = frozen(info['anchor'], anchor, 'anchor',
                                     '--anchor')
  params = {'anchor': anchor_params}
  augs = []
  for entry in info['augmenting']:
    name = entry['name']
    cfg, params[f'aug_{name}'] = frozen(
        entry, augmenting.get(name), f'augmenting model {name!r}',
        f'--augmenting {name}')
    augs.append(composition_lib.Augmenting(
        name, cfg, tuple(tuple(p) for p in entry['pairs'])))
  ckpt_dir = os.path.join(run_dir, info.get('checkpoints', 'checkpoints'))
  params['composition'], _ = checkpoints.load_composition(ckpt_dir,
                                                          step=step)
  b = info['bridge']
  bridge = composition_lib.BridgeConfig.make(
      b['name'], b['cross_heads'], b['options'], f'{FILE}: bridge')
  model = composition_lib.ComposedLM(
      anchor_cfg, tuple(augs), bridge=bridge,
      prompt_only=info.get('prompt_only', False),
      align=info.get('align', composition_lib.ALIGN_NONE))
  return model, params, tok, info


def _recorded_tokenizer(record: Mapping[str, Any], what: str) -> Any:
  """The tokenizer a composition file records for `what`, unchanged."""
  spec = record['spec']
  try:
    tok = tokenizers.get_tokenizer(spec)
  except ValueError as e:
    raise ValueError(f'{FILE}: the tokenizer of the {what} ({spec!r}) cannot '
                     f'be loaded ({e}).') from e
  if tok.fingerprint != record['fingerprint']:
    raise ValueError(f'{FILE}: the tokenizer of the {what} at {spec!r} has '
                     'changed since the composition was trained.')
  return tok
