"""The interpreter's standard library as a code corpus: its files, their
module names, the split by file, and LM chunks of code."""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import keyword
import os

import numpy as np

from calm_jax.data.code.base import CodeCorpusConfig
from calm_jax.data.code.base import FILE_SPLIT_STREAM
from calm_jax.data.code.base import FileSplit
from calm_jax.data.code.base import MAX_FILES_STREAM
from calm_jax.data.code.base import SourceFile
from calm_jax.data.code.base import stdlib_root
from calm_jax.data.code.functions import has_runnable_doctest
from calm_jax.data.code.texts import chunk_text
from calm_jax.data.code.texts import make_example

# Directory names never descended into under the standard library.
EXCLUDED_DIRS = frozenset({
    'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
    '__pycache__', 'pydoc_data'})

# Modules whose import has side effects (opens a browser, prints); their
# doctests are not run, so they get module ''.
_UNSAFE_MODULES = frozenset({'antigravity', 'this', '__hello__', '__phello__'})


# Files.


def list_source_files(root: str) -> list[str]:
  """Sorted relative paths of the `*.py` files under `root` to consider."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(
        d for d in dirnames if d not in EXCLUDED_DIRS and
        not os.path.islink(os.path.join(dirpath, d)))
    for name in filenames:
      full = os.path.join(dirpath, name)
      if (name.endswith('.py') and not os.path.islink(full) and
          os.path.isfile(full)):
        paths.append(os.path.relpath(full, root).replace(os.sep, '/'))
  return sorted(paths)


def module_name(root: str, rel_path: str) -> str:
  """The module name importing `rel_path` when `root` is on sys.path, or ''.

  '' when a directory on the way has no `__init__.py`, a part is not an
  identifier, it is a `__main__`, or importing it has side effects.
  """
  parts = rel_path[:-len('.py')].split('/')
  if parts[-1] == '__init__':
    parts = parts[:-1]
  if not parts:
    return ''
  for part in parts:
    if (not part.isidentifier() or keyword.iskeyword(part) or
        part == '__main__'):
      return ''
  if parts[0] in _UNSAFE_MODULES:
    return ''
  dirs = rel_path.split('/')[:-1]
  for i in range(1, len(dirs) + 1):
    if not os.path.isfile(os.path.join(root, *dirs[:i], '__init__.py')):
      return ''
  return '.'.join(parts)


def load_files(config: CodeCorpusConfig) -> list[SourceFile]:
  """The corpus files, de-duplicated by content, sorted by path.

  Files that are not UTF-8 or are blank are skipped; of identical files the
  first by path is kept. With `max_files`, a deterministic subset.
  """
  root = stdlib_root(config)
  files, seen = [], set()
  for rel in list_source_files(root):
    try:
      # Text mode translates '\r\n' and '\r' to '\n', as ast expects.
      with open(os.path.join(root, rel), encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    if not text.strip():
      continue
    digest = hashlib.sha256(text.encode('utf-8')).digest()
    if digest in seen:
      continue
    seen.add(digest)
    files.append(SourceFile(rel, text, module_name(root, rel)))
  if config.max_files and len(files) > config.max_files:
    rng = np.random.default_rng([config.seed, MAX_FILES_STREAM])
    keep = np.sort(rng.choice(len(files), config.max_files, replace=False))
    files = [files[i] for i in keep]
  return files


def split_files(config: CodeCorpusConfig,
                files: Sequence[SourceFile] | None = None) -> FileSplit:
  """Splits the files (`load_files(config)` by default) by file."""
  if files is None:
    files = load_files(config)
  n = len(files)
  n_eval = max(1, int(round(config.eval_file_fraction * n)))
  n_compose = max(1, int(round(config.compose_file_fraction * n)))
  if n - n_eval < n_compose:
    where = config.stdlib_dir or stdlib_root(config)
    raise ValueError(
        f'data.code.max_files={config.max_files}: only {n} distinct non-empty '
        f'.py files found under {where!r}; need >= {n_eval + n_compose} for '
        f'{n_eval} eval and {n_compose} compose file(s). Raise '
        'data.code.max_files (0 = all) or point data.code.stdlib_dir at a '
        'directory with more files.')
  rng = np.random.default_rng([config.seed, FILE_SPLIT_STREAM])
  perm = rng.permutation(n)
  # Runnable doctests are rare (a few dozen short functions in the whole
  # stdlib), so the files holding them are split on their own: half of them
  # (rounded up, within n_eval) are held out, so that the pass rate has
  # something to score; the rest of the held-out files are drawn as before.
  tested = np.array([has_runnable_doctest(files[i], config.max_chars)
                     for i in perm], bool)
  n_tested_eval = min(n_eval, (int(tested.sum()) + 1) // 2)
  first = np.concatenate([perm[tested][:n_tested_eval],
                          perm[tested][n_tested_eval:], perm[~tested]])
  held = np.concatenate([first[:n_tested_eval], perm[~tested][
      :n_eval - n_tested_eval]])
  rest = np.setdiff1d(perm, held, assume_unique=True)
  rest = perm[np.isin(perm, rest)]  # In permutation order.
  perm = np.concatenate([held, rest])

  def pick(indices: np.ndarray) -> list[SourceFile]:
    return [files[i] for i in np.sort(indices)]

  return FileSplit(train=pick(perm[n_eval:]),
                   compose=pick(perm[n_eval:n_eval + n_compose]),
                   eval=pick(perm[:n_eval]))


def code_chunks(files: Sequence[SourceFile],
                max_bytes: int) -> list[dict[str, str]]:
  """LM examples (prompt '', task 'code') of the files, in file order."""
  return [
      make_example('', chunk, 'code', module=f.module)
      for f in files for chunk in chunk_text(f.text, max_bytes)
      if chunk.strip()
  ]
