"""Your own data: JSONL files, plain-text files, or a TFDS dataset by name.

`data.dataset` picks the source; every source has the splits `train` and
`eval`:

  jsonl  `data.train` / `data.eval`: paths or globs, comma-separated. Each
         line is an object with either a `text` field (language-model style:
         the loss covers every token) or `prompt` and `completion` fields
         (the loss covers the completion only). The key names are
         `data.text_key`, `data.prompt_key`, `data.completion_key`.
  text   the same paths, each file one document (language-model style).
  tfds   `data.tfds_name` (registered and prepared in array_record format
         under `data.tfds_data_dir`); `data.train` / `data.eval` are TFDS
         split specs such as 'train' or 'train[:95%]'; the same key fields
         name its features.

With `data.eval` empty, `eval` is a seeded `data.eval_fraction` of the
training documents (`data.split_seed`), held out of `train`.

JSONL and text files are converted once into a TFDS array_record dataset
under the workdir (`WORKDIR/tfds/user_files/<hash>`), keyed by a hash of
the files' bytes and of these options: an edited file is converted anew, an
unchanged one is read from disk. A TFDS dataset is read where it lies.
Every example becomes {'prompt', 'target'} (`prompt` '' for language-model
style) plus `origin` ('FILE:LINE'), which the input pipeline tokenizes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Sequence

from absl import logging
import ml_collections
import tensorflow_datasets as tfds

from calm_jax.data import generated

SPLITS = ('train', 'eval')
FORMATS = ('jsonl', 'text', 'tfds')
# Bumped when the conversion changes, so old caches are not reused.
_CONVERSION = 1


@dataclasses.dataclass(eq=False)
class UserFilesConfig(tfds.core.BuilderConfig):
  """Files and options of one conversion; `name` is their content hash."""

  format: str = 'jsonl'
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  eval_fraction: float = 0.05
  split_seed: int = 0
  text_key: str = 'text'
  prompt_key: str = 'prompt'
  completion_key: str = 'completion'


def _fail(field: str, value: Any, msg: str):
  raise ValueError(f'{field}={value!r}: {msg}')


def expand(spec: str, field: str) -> tuple[str, ...]:
  """The files of 'a.jsonl,dir/*.jsonl' (sorted per pattern), or an error."""
  if not isinstance(spec, str) or not spec.strip():
    _fail(field, spec, 'give one or more files or globs, comma-separated.')
  out = []
  for pattern in (p.strip() for p in spec.split(',')):
    if not pattern:
      continue
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      _fail(field, spec, f'{pattern!r} matches no file; check the path '
            '(relative paths are read from the current directory).')
    out.extend(os.path.abspath(m) for m in matches)
  return tuple(dict.fromkeys(out))  # Once each, in order.


def _check_keys(data_cfg: ml_collections.ConfigDict) -> None:
  for key in ('text_key', 'prompt_key', 'completion_key'):
    value = data_cfg.get(key, '')
    if not isinstance(value, str) or not value:
      _fail(f'data.{key}', value, 'must name a field, e.g. '
            f"{key.split('_')[0]!r}.")


def check_data_config(data_cfg: ml_collections.ConfigDict) -> Any:
  """Checks the user-data fields of `config.data` without reading the data.

  Returns the conversion config (jsonl, text) or None (tfds).
  """
  fmt = data_cfg.dataset
  _check_keys(data_cfg)
  frac = data_cfg.get('eval_fraction', 0.05)
  if not data_cfg.get('eval', ''):
    if (not isinstance(frac, (int, float)) or isinstance(frac, bool)
        or not 0.0 < frac < 1.0):
      _fail('data.eval_fraction', frac, 'with data.eval empty, the eval '
            'split is this fraction of the training documents: a number in '
            '(0, 1), e.g. 0.05; or give data.eval files.')
  seed = data_cfg.get('split_seed', 0)
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    _fail('data.split_seed', seed, 'must be an int >= 0.')
  if fmt == 'tfds':
    if not data_cfg.get('tfds_name', ''):
      _fail('data.tfds_name', data_cfg.get('tfds_name', ''),
            "data.dataset='tfds' reads a TFDS dataset by name; set it, e.g. "
            "'lm1b' (prepared with --file_format=array_record).")
    if not data_cfg.get('train', ''):
      _fail('data.train', '', "name the TFDS split to train on, e.g. "
            "'train' or 'train[:95%]'.")
    return None
  train = expand(data_cfg.get('train', ''), 'data.train')
  eval_spec = data_cfg.get('eval', '')
  evals = expand(eval_spec, 'data.eval') if eval_spec else ()
  return make_config(format=fmt, train_files=train, eval_files=evals,
                     eval_fraction=float(frac), split_seed=seed,
                     text_key=data_cfg.text_key,
                     prompt_key=data_cfg.prompt_key,
                     completion_key=data_cfg.completion_key)


def _content_hash(files: Sequence[str]) -> str:
  h = hashlib.sha256()
  for path in files:
    h.update(path.encode() + b'\0')
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        h.update(block)
    h.update(b'\0')
  return h.hexdigest()


def make_config(**fields: Any) -> UserFilesConfig:
  """The conversion config, named by a hash of the files and options."""
  config = UserFilesConfig(name='unnamed', **fields)
  options = {f.name: getattr(config, f.name)
             for f in dataclasses.fields(UserFilesConfig)
             if f.name not in {b.name for b in dataclasses.fields(
                 tfds.core.BuilderConfig)} and not f.name.endswith('_files')}
  digest = hashlib.sha256(json.dumps({
      'conversion': _CONVERSION, 'options': options,
      'train': _content_hash(config.train_files),
      'eval': _content_hash(config.eval_files)}, sort_keys=True).encode())
  config.name = f'{config.format}_{digest.hexdigest()[:16]}'
  config.description = (f'{len(config.train_files)} train and '
                        f'{len(config.eval_files)} eval files.')
  return config


def _example(record: dict[str, Any], config: UserFilesConfig, origin: str,
             field: str) -> dict[str, str]:
  """{'prompt', 'target', 'origin'} of one JSON object or TFDS record."""
  def text(key):
    value = record[key]
    if isinstance(value, bytes):
      value = value.decode('utf-8')
    if not isinstance(value, str):
      raise ValueError(f'{field}: {origin}: field {key!r} is of type '
                       f'{type(value).__name__}, not a string; fix the '
                       'data or set data.text_key / prompt_key / '
                       'completion_key to a string field.')
    return value
  if config.prompt_key in record and config.completion_key in record:
    return {'prompt': text(config.prompt_key),
            'target': text(config.completion_key), 'origin': origin}
  if config.text_key in record:
    return {'prompt': '', 'target': text(config.text_key), 'origin': origin}
  raise ValueError(
      f'{field}: {origin} has neither {config.text_key!r} nor '
      f'{config.prompt_key!r} and {config.completion_key!r} (its fields: '
      f'{sorted(record)}); set data.text_key, or data.prompt_key and '
      'data.completion_key, to its field names.')


def read_files(config: UserFilesConfig, files: Sequence[str], field: str
               ) -> list[dict[str, str]]:
  """Every example of `files` in order; errors name the file and line."""
  out = []
  for path in files:
    if config.format == 'text':
      with open(path, encoding='utf-8', errors='strict') as f:
        try:
          content = f.read()
        except UnicodeDecodeError as e:
          raise ValueError(f'{field}: {path} is not UTF-8 text ({e}).') from e
      if content.strip():
        out.append({'prompt': '', 'target': content, 'origin': path})
      else:
        logging.warning('%s: %s is empty; skipped.', field, path)
      continue
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        origin = f'{path}:{number}'
        try:
          record = json.loads(line)
        except ValueError as e:
          raise ValueError(f'{field}: {origin} is not a JSON object ({e}); '
                           'each line of a JSONL file holds one.') from e
        if not isinstance(record, dict):
          raise ValueError(f'{field}: {origin} is a JSON value of type '
                           f'{type(record).__name__}, not an object.')
        out.append(_example(record, config, origin, field))
  if not out:
    raise ValueError(f'{field}: {", ".join(files)} '
                     f'{"holds" if len(files) == 1 else "hold"} no examples; '
                     'give files with at least one line each.')
  return out


def split_off(examples: list[Any], fraction: float, seed: int
              ) -> tuple[list[Any], list[Any]]:
  """(train, eval): a seeded `fraction` of the examples (at least one)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = len(examples)
  if n < 2:
    raise ValueError(
        f'data.eval is empty and data.train holds {n} document(s): holding '
        f'out data.eval_fraction={fraction} needs at least 2. Give '
        'data.eval files, or more training documents.')
  order = np.random.default_rng(seed).permutation(n)
  n_eval = min(n - 1, max(1, round(fraction * n)))
  held = set(order[-n_eval:].tolist())
  return ([e for i, e in enumerate(examples) if i not in held],
          [examples[i] for i in sorted(held)])


class UserFiles(generated.GeneratedText):
  """Examples of the user's JSONL or text files (see the module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  TEXT_FIELDS = ('prompt', 'target', 'origin')

  def generate_splits(self) -> dict[str, list[dict[str, str]]]:
    config = self.builder_config
    train = read_files(config, config.train_files, 'data.train')
    if config.eval_files:
      evals = read_files(config, config.eval_files, 'data.eval')
    else:
      train, evals = split_off(train, config.eval_fraction,
                               config.split_seed)
    return {'train': train, 'eval': evals}


class _Mapped(Sequence):
  """A random-access source whose records are turned into examples."""

  def __init__(self, source: Sequence[Any], config: UserFilesConfig,
               name: str, split: str, field: str):
    self._source, self._config = source, config
    self._name, self._split, self._field = name, split, field

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, str]:
    return _example(self._source[index], self._config,
                    f'{self._name}/{self._split}[{index}]', self._field)


def _tfds_source(split: str, data_cfg: ml_collections.ConfigDict,
                 split_field: str) -> Sequence[Any]:
  name = data_cfg.tfds_name
  spec = data_cfg.get(split, '') or ''
  data_dir = data_cfg.get('tfds_data_dir', '') or None
  if split == 'eval' and not spec:
    # The held-out tail of the training split.
    pct = round(100 * data_cfg.get('eval_fraction', 0.05))
    base = data_cfg.train.split('[', 1)[0]
    if '[' in data_cfg.train:
      _fail('data.eval', '', f'data.train={data_cfg.train!r} is already a '
            'slice; give the eval split explicitly, e.g. '
            f"'{base}[95%:]'.")
    spec = f'{base}[{100 - pct}%:]'
  elif split == 'train' and not data_cfg.get('eval', '') and '[' not in spec:
    pct = round(100 * data_cfg.get('eval_fraction', 0.05))
    spec = f'{spec}[:{100 - pct}%]'
  try:
    source = tfds.data_source(name, split=spec, data_dir=data_dir,
                              download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'data.tfds_name={name!r} is not a registered TFDS '
                     'dataset; import the module that defines it, or fix '
                     'the name.') from e
  except (ValueError, NotImplementedError, AssertionError,
          FileNotFoundError) as e:
    raise ValueError(
        f'data.tfds_name={name!r}, {split_field} split {spec!r}: '
        f'{str(e).splitlines()[0][:300]} (prepare it with `tfds build '
        f'{name} --file_format=array_record`, and point '
        'data.tfds_data_dir at its data directory).') from e
  config = UserFilesConfig(name='tfds', format='tfds',
                           text_key=data_cfg.text_key,
                           prompt_key=data_cfg.prompt_key,
                           completion_key=data_cfg.completion_key)
  if len(source):  # Fail on the keys now, not in a reader thread.
    _example(source[0], config, f'{name}/{spec}[0]', split_field)
  return _Mapped(source, config, name, spec, f'data.{split}')


def source(split: str, data_cfg: ml_collections.ConfigDict, data_dir: str,
           split_field: str = 'train.split') -> Sequence[Any]:
  """The random-access examples of `split`, converted on first use."""
  if split not in SPLITS:
    raise ValueError(
        f'Unknown split {split_field}={split!r} for data.dataset='
        f'{data_cfg.dataset!r}. Valid splits: {list(SPLITS)} (data.train '
        f'and data.eval). Set config.{split_field} to one of them.')
  if data_cfg.dataset == 'tfds':
    return _tfds_source(split, data_cfg, split_field)
  config = check_data_config(data_cfg)
  builder = generated.prepare(UserFiles, config, data_dir)
  return generated.data_source(builder, split, split_field,
                               'the files hold no examples for it')


def documents_only(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether every example is a document (no prompt): then none is too
  long, since the pipeline cuts documents into rows, and the check that
  reads every example before training can be skipped (a TFDS corpus may
  hold millions)."""
  if data_cfg.dataset == 'text':
    return True
  if data_cfg.dataset == 'tfds':
    features = tfds.builder(data_cfg.tfds_name,
                            data_dir=data_cfg.get('tfds_data_dir', '') or None
                            ).info.features
    return not (data_cfg.prompt_key in features and
                data_cfg.completion_key in features)
  return False
