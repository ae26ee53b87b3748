"""Text into examples: chunks at line boundaries, records packed to a
size, example dicts and deterministic samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calm_jax.data.code.base import PROSE_SEPARATOR
from calm_jax.data.code.base import utf8_len

# Chunking.


def split_lines(text: str) -> list[str]:
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
  for line in split_lines(text):
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


def make_example(prompt: str, target: str, task: str, *, tests: str = '',
             module: str = '', name: str = '') -> dict[str, str]:
  return {'prompt': prompt, 'target': target, 'task': task, 'tests': tests,
          'module': module, 'name': name}



def sample(examples: list[dict[str, str]], count: int, seed: int,
            stream: int) -> list[dict[str, str]]:
  """A deterministic sample of `count` examples, in their original order."""
  if len(examples) <= count:
    return examples
  rng = np.random.default_rng([seed, stream])
  keep = np.sort(rng.choice(len(examples), count, replace=False))
  return [examples[i] for i in keep]


