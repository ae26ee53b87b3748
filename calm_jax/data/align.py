"""Character alignment of two token streams of one text (`composition.align`).

When the anchor and an augmenting model use different tokenizers, each reads
the same text with its own tokenizer, and anchor position t may read
augmenting position s only if token s is *known* from the characters the
anchor has read by the end of its token t. This module computes, per
example, the augmenting model's ids and, for each anchor position, how many
augmenting tokens it may read (`counts`): the bridges' cross-attention mask
is then `s < counts[t]`.

Ends are in characters (code points), from the tokenizers' own offsets:

  * an anchor token ends at the last character it covers *entirely* (a byte
    in the middle of a multi-byte character has not finished it);
  * an augmenting token is *known* once every character it depends on has
    been read. For byte and character tokenizers that is its own end. A
    subword tokenizer (BPE, SentencePiece) may still change a token while
    the word goes on ('he' becomes 'hello'), so its tokens are known once
    the whitespace that ends their word has been read: the first whitespace
    run that starts at or after the token's end. Subword tokenizers that
    merge only within a word (byte-level BPE with GPT-2's pre-tokenizer,
    SentencePiece with split_by_whitespace, the default) never change a
    token of a finished word, so the anchor never reads a token that a
    later character would have changed: causal in characters, and what a
    decoder that sees the text one token at a time can read.

A prompt is complete before anything is generated, so its last word is
known at its last character. Counts are non-decreasing: an anchor position
reads a prefix of the augmenting stream, as the causal augmenting model
computes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

# `composition.align` values.
NONE, CHARS, AUTO = 'none', 'chars', 'auto'
MODES = (AUTO, NONE, CHARS)


def prefix_stable(tok: Any) -> bool:
  """Whether a token never changes as text is appended (bytes, chars)."""
  return getattr(tok, 'name', '') == 'byte' or str(
      getattr(tok, 'name', '')).startswith('char')


def _byte_to_char(text: str) -> tuple[np.ndarray, np.ndarray]:
  """For each UTF-8 byte offset o in [0, len(bytes)]: the characters wholly
  before o (floor) and the characters touched before o (ceil)."""
  sizes = [len(c.encode('utf-8')) for c in text]
  nbytes = sum(sizes)
  floor = np.zeros(nbytes + 1, np.int64)
  ceil = np.zeros(nbytes + 1, np.int64)
  o = 0
  for i, n in enumerate(sizes):
    for k in range(1, n + 1):
      floor[o + k] = i + (k == n)
      ceil[o + k] = i + 1
    o += n
  return floor, ceil


@dataclasses.dataclass
class Spans:
  """One text's tokens: ids and, per token, its character end (floor: the
  characters it completes; ceil: the characters it touches)."""
  ids: list[int]
  floor: np.ndarray
  ceil: np.ndarray


def spans(tok: Any, text: str) -> Spans:
  """`tok.encode(text)` with each token's character ends."""
  name = getattr(tok, 'name', '')
  if name == 'byte':
    ids = tok.encode(text)
    floor, ceil = _byte_to_char(text)
    return Spans(ids, floor[1:], ceil[1:])
  if str(name).startswith('char'):
    ids = tok.encode(text)
    ends = np.arange(1, len(ids) + 1, dtype=np.int64)
    return Spans(ids, ends, ends.copy())
  offsets = getattr(tok, 'offsets', None)
  if offsets is None:
    raise ValueError(
        f'composition.align: tokenizer {getattr(tok, "spec", tok)!r} gives '
        'no character offsets; align needs a byte, char or checkpoint '
        '(tokenizer.json or SentencePiece) tokenizer.')
  ids, starts, ends, unit = offsets(text)
  starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
  if unit == 'bytes':
    floor_of, ceil_of = _byte_to_char(text)
    starts_c = floor_of[starts]
    floor_end, ceil_end = floor_of[ends], ceil_of[ends]
  else:
    starts_c, floor_end, ceil_end = starts, ends, ends.copy()
  n = len(ids)
  # A token shares a character with the next ones when they split it (byte
  # pieces): it completes only what lies before their start.
  later_start = np.minimum.accumulate(
      np.append(starts_c, [np.iinfo(np.int64).max])[::-1])[::-1][1:]
  floor_end = np.minimum(floor_end, later_start) if n else floor_end
  # An empty token (SentencePiece's leading '▁', the first bytes of a
  # character) depends on the next token that covers a character.
  ceil_end = ceil_end.copy()
  nxt = len(text)
  for i in range(n - 1, -1, -1):
    if ends[i] <= starts[i]:
      ceil_end[i] = max(ceil_end[i], nxt)
    else:
      nxt = ceil_end[i]
  return Spans(list(ids), floor_end, np.maximum.accumulate(ceil_end)
               if n else ceil_end)


def known_ends(tok: Any, text: str, ceil: np.ndarray, complete: bool
           ) -> np.ndarray:
  """When each token of `text` is known: characters read (see the module
  docstring); past len(text) when it never is (an unfinished last word)."""
  if prefix_stable(tok):
    return ceil
  starts = [w for w, c in enumerate(text)
            if c.isspace() and (w == 0 or not text[w - 1].isspace())]
  runs = np.asarray(starts, np.int64)
  k = np.searchsorted(runs, ceil, side='left')
  never = len(text) + 1
  out = np.where(k < len(runs), runs[np.minimum(k, len(runs) - 1)] + 1
                 if len(runs) else never, never)
  if complete:
    out = np.minimum(out, len(text))
  return np.maximum(out, ceil)


@dataclasses.dataclass
class Aligned:
  """One example's augmenting stream, aligned to the anchor's inputs.

  `ids`: BOS + prompt + target in the augmenting tokenizer (no EOS: the
  anchor's inputs hold none either); `counts[t]`: how many of them anchor
  input position t may read; `prompt_count`: how many lie in the prompt
  (BOS included), for the prompt-only ablation.
  """
  ids: np.ndarray
  counts: np.ndarray
  prompt_count: int


def aug_stream(aug: Any, prompt: str, target: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """The augmenting stream of `[BOS] prompt target`: (ids, known), where
  known[s] is the number of characters of prompt + target after which
  token s is known (non-decreasing; BOS at 0). `target` may be unfinished
  (decoding): its last word stays unknown."""
  m_p, m_t = spans(aug, prompt), spans(aug, target)
  known = np.concatenate([
      [0], known_ends(aug, prompt, m_p.ceil, complete=True),
      len(prompt) + known_ends(aug, target, m_t.ceil, complete=False)])
  ids = np.asarray([aug.bos_id] + m_p.ids + m_t.ids, np.int32)
  return ids, np.maximum.accumulate(known).astype(np.int64)


def anchor_reads(anchor: Any, prompt: str, target: str) -> np.ndarray:
  """Characters of prompt + target read by the end of each anchor input
  ([BOS] + encode(prompt) + encode(target)); BOS reads none."""
  a_p, a_t = spans(anchor, prompt), spans(anchor, target)
  return np.concatenate([[0], a_p.floor, len(prompt) + a_t.floor]
                        ).astype(np.int64)


def counts_of(known: np.ndarray, reads: np.ndarray) -> np.ndarray:
  """How many augmenting tokens each anchor position reads."""
  return np.searchsorted(known, reads, side='right').astype(np.int32)


def align_example(prompt: str, target: str, anchor: Any, aug: Any
                  ) -> Aligned:
  """The augmenting stream of `[BOS] prompt target` and its counts.

  The anchor's inputs are [BOS] + encode(prompt) + encode(target), as the
  data pipeline builds them (prompt and target tokenized apart), and so is
  the augmenting stream. With one tokenizer on both sides the streams are
  the same and anchor position t reads s <= t, as without alignment.
  """
  if anchor.fingerprint == aug.fingerprint:
    ids = [anchor.bos_id] + anchor.encode(prompt) + anchor.encode(target)
    n = len(ids)
    return Aligned(np.asarray(ids, np.int32), np.arange(1, n + 1,
                                                        dtype=np.int32),
                   1 + len(anchor.encode(prompt)))
  ids, known = aug_stream(aug, prompt, target)
  counts = counts_of(known, anchor_reads(anchor, prompt, target))
  return Aligned(ids, counts, int(np.sum(known <= len(prompt))))


# ------------------------------------------------------------------ batches
#
# An aligned batch carries, for each augmenting model `name`, its stream
# beside the anchor's: `aug/<name>/inputs` [b, s] (its token ids),
# `aug/<name>/counts` [b, t] (per anchor input: how many of them it reads;
# in packed rows counted from the start of the row), `aug/<name>/prompt_mask`
# [b, s] (1 at its BOS and prompt tokens) and, in packed rows,
# `aug/<name>/segment_ids` and `aug/<name>/positions` [b, s].
PREFIX = 'aug/'
FIELDS = ('inputs', 'counts', 'prompt_mask', 'segment_ids', 'positions')


def key(name: str, field: str) -> str:
  """The batch key of augmenting model `name`'s `field`."""
  return f'{PREFIX}{name}/{field}'


def model_inputs(batch: Any) -> dict[str, dict[str, Any]] | None:
  """`ComposedLM`'s `aug_inputs` from an aligned batch, or None if the
  batch has no aligned streams."""
  out: dict[str, dict[str, Any]] = {}
  for k, v in batch.items():
    if not k.startswith(PREFIX):
      continue
    name, field = k[len(PREFIX):].rsplit('/', 1)
    out.setdefault(name, {})['tokens' if field == 'inputs' else field] = v
  return out or None
