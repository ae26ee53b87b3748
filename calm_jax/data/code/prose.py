"""English prose for the anchor: the fortune files of Debian's `fortunes`."""

from __future__ import annotations

from collections.abc import Sequence
import os
import string

import numpy as np

from calm_jax.data.code.base import CodeCorpusConfig
from calm_jax.data.code.base import PROSE_SPLIT_STREAM
from calm_jax.data.code.base import PROSE_SUBSET_STREAM
from calm_jax.data.code.base import validate_config
from calm_jax.data.code.texts import make_example
from calm_jax.data.code.texts import pack_records

# Prose filter: printable ASCII (no vertical tab, form feed or CR), mostly
# letters, and at least one common English word.
_PRINTABLE = frozenset(string.printable) - frozenset('\x0b\x0c\r')
_MIN_LETTER_FRACTION = 0.7
_MIN_WORDS = 3
_ENGLISH_WORDS = frozenset(
    'the a an and of to is in it you i that he she we they was for on be '
    'are not with as have this me my no up your there here all but or if '
    'what do so can will at by his her from one'.split())


# Prose.


def _clean_record(record: str) -> str:
  lines = [line.rstrip() for line in record.split('\n')]
  return '\n'.join(lines).strip('\n')


def is_prose(record: str) -> bool:
  """Whether a record is printable ASCII and reads like English prose."""
  if not record.strip() or any(c not in _PRINTABLE for c in record):
    return False
  visible = [c for c in record if not c.isspace()]
  letters = sum(c.isalpha() for c in visible)
  if letters < _MIN_LETTER_FRACTION * len(visible):
    return False
  words = [w.strip(string.punctuation).lower() for w in record.split()]
  words = [w for w in words if w.isalpha()]
  return len(words) >= _MIN_WORDS and any(w in _ENGLISH_WORDS for w in words)


def split_records(text: str) -> list[str]:
  """Cleaned records of a fortune file: lines of a single '%' separate them."""
  records, current = [], []
  for line in text.replace('\r\n', '\n').split('\n'):
    if line.strip() == '%':
      records.append('\n'.join(current))
      current = []
    else:
      current.append(line)
  records.append('\n'.join(current))
  return [r for r in map(_clean_record, records) if r]


def prose_files(prose_dir: str) -> list[str]:
  """Sorted paths of the prose files: extensionless or `*.txt` regular files.

  Skips symlinks (the fortunes package links `*.u8` to the plain files),
  hidden files and other extensions (`*.dat` indices).
  """
  paths = []
  for name in sorted(os.listdir(prose_dir)):
    path = os.path.join(prose_dir, name)
    ext = os.path.splitext(name)[1]
    if (name.startswith('.') or ext not in ('', '.txt') or
        os.path.islink(path) or not os.path.isfile(path)):
      continue
    paths.append(path)
  return paths


def load_prose(config: CodeCorpusConfig) -> list[str]:
  """The prose records of `prose_dir`, in file then position order."""
  if not os.path.isdir(config.prose_dir):
    validate_config(config)  # Raises with the fix.
  records = []
  for path in prose_files(config.prose_dir):
    with open(path, 'rb') as f:
      text = f.read().decode('utf-8', errors='replace')
    records.extend(r for r in split_records(text) if is_prose(r))
  if len(records) < 2:
    raise ValueError(
        f'data.code.prose_dir={config.prose_dir!r}: found {len(records)} '
        'English prose record(s); need >= 2 (one train, one eval). Install '
        '`apt-get install fortunes` or add .txt files of English prose.')
  return records


def split_prose(config: CodeCorpusConfig, records: Sequence[str] | None = None
                ) -> tuple[list[str], list[str]]:
  """(train, eval) prose records, each in original order."""
  if records is None:
    records = load_prose(config)
  if config.max_prose_records and len(records) > config.max_prose_records:
    rng = np.random.default_rng([config.seed, PROSE_SUBSET_STREAM])
    keep = np.sort(rng.choice(len(records), config.max_prose_records,
                              replace=False))
    records = [records[i] for i in keep]
  n = len(records)
  n_eval = min(n - 1, max(1, int(round(config.prose_eval_fraction * n))))
  rng = np.random.default_rng([config.seed, PROSE_SPLIT_STREAM])
  held_out = set(rng.permutation(n)[:n_eval].tolist())
  train = [r for i, r in enumerate(records) if i not in held_out]
  held = [r for i, r in enumerate(records) if i in held_out]
  return train, held


def prose_chunks(records: Sequence[str],
                 max_bytes: int) -> list[dict[str, str]]:
  return [make_example('', chunk, 'prose')
          for chunk in pack_records(records, max_bytes) if chunk.strip()]


