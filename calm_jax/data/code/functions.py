"""Function pairs of Python source: docstring -> body, function -> docstring,
and which of them carry doctests the sandbox can run."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
import dataclasses
import textwrap
import warnings

from calm_jax.data.code.base import SourceFile
from calm_jax.data.code.base import utf8_len
from calm_jax.data.code.texts import split_lines
from calm_jax.data.code.texts import make_example

CODE2DOC_SEPARATOR = '\n# Docstring:\n'


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
    lines = split_lines(source)
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
  return make_example(pair.header, pair.body, 'doc2code', tests=tests,
                  module=module, name=pair.name)


def code2doc_example(pair: FunctionPair, module: str) -> dict[str, str]:
  """Code-to-text: function without docstring -> docstring."""
  return make_example(pair.without_docstring + CODE2DOC_SEPARATOR, pair.docstring,
                  'code2doc', module=module, name=pair.name)


def has_runnable_doctest(f: SourceFile, max_chars: int) -> bool:
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


