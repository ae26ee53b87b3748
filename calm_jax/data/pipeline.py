"""Grain input pipelines: TFDS array_record sources to fixed-shape batches.

Every example is one sequence `[BOS] prompt target [EOS]`; the loss weights
cover only the target and EOS predictions, so the models are trained (and
scored) on answers, never on prompts. A *document* (an example whose prompt
is empty: language-model text) is weighted on every token.

Rows are either padded (one example per row, `[BOS] prompt target [EOS]
PAD...`, with `prompt_len`), or, with `pack=True`, packed: short examples
share a row, each with its own `segment_ids` (1, 2, ...; 0 is padding) and
`positions` (restarting at 0), so that attention never crosses from one
into another; `prompt_mask` marks each one's BOS and prompt. Documents
longer than a row are cut into row-sized pieces; a prompt/completion
example that does not fit is an error, found before training
(`check_fits`).

Training (`train_dataset`) reads a per-process slice of the source, shuffles
it globally with a seed (reshuffled every epoch), repeats forever, encodes and
batches. `batch_size` is the per-process batch; the trainer assembles global
arrays with `jax.make_array_from_process_local_data`, passing
`shard_index=jax.process_index(), shard_count=jax.process_count()` here.

Checkpointing the iterator (MaxText style). The iterator state is a small
JSON dict (grain records how many elements were consumed; prefetched but
unconsumed elements are not counted), saved next to the model state:

    it = iter(train_dataset(...))
    mngr = ocp.CheckpointManager(ckpt_dir)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(it)))
    ...
    it = iter(train_dataset(...))  # Same arguments as before.
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))
    # `it` was restored in place (restored['data'] is it) and yields exactly
    # the batches the saved run would have produced next.

Each process writes its own `process_<i>-of-<n>.json`. Without orbax,
`it.get_state()` / `it.set_state(state)` round-trip the same dict.

Evaluation (`eval_batches`) is a short deterministic list of padded numpy
batches carrying what greedy decoding and exact match need.

Aligned streams (`aligned`: augmenting model name -> its tokenizer, for
`composition.align='chars'`). Every row then also carries, per name, the
augmenting model's own reading of the same text (`calm_jax.data.align`):
`aug/<name>/inputs` [aug_seq_len] (its BOS, prompt and target tokens, no
EOS, padded with its pad id), `aug/<name>/counts` [seq_len] (how many of
them each anchor input may read, counted from the start of the row; 0 at
padding), `aug/<name>/prompt_mask` [aug_seq_len] (its BOS and prompt) and,
packed, `aug/<name>/segment_ids` and `aug/<name>/positions` [aug_seq_len]
(the segment of the anchor piece each token belongs to; positions restart
at 0 per piece). A document longer than a row is then cut by its *text*, at
character boundaries, into pieces that fit both `seq_len` anchor positions
and `aug_seq_len` positions of every stream; each piece is aligned on its
own, and every piece's stream starts with the augmenting BOS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import importlib
from typing import Any

import grain
import ml_collections
import numpy as np

from calm_jax.data import align
from calm_jax.data import files
from calm_jax.data import tokenizers

Batch = dict[str, np.ndarray]
# Augmenting model name -> its tokenizer: the streams a row carries besides
# the anchor's (see the module docstring); None: the anchor's only.
AugTokenizers = Mapping[str, tokenizers.Tokenizer]
AUG_SEQ_LEN_FIELD = 'data.aug_seq_len'


def _text(value: Any) -> str:
  """TFDS data sources return Text features as bytes; generators give str."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):  # 0-d object/bytes array.
    return _text(value.item())
  return str(value)


def _is_text(value: Any) -> bool:
  if isinstance(value, np.ndarray):
    return value.ndim == 0 and value.dtype.kind in 'OSU'
  return isinstance(value, (str, bytes))


# Keys of precomputed per-example arrays that ride along with an example.
CACHED = 'cached/'


def _aug_len(seq_len: int, aug_seq_len: int) -> int:
  """The length of every augmenting row (`aug_seq_len`, 0: `seq_len`)."""
  if not isinstance(aug_seq_len, (int, np.integer)) or aug_seq_len < 0:
    raise ValueError(f'{AUG_SEQ_LEN_FIELD}={aug_seq_len!r} must be an int '
                     '>= 0 (0: data.seq_len).')
  return int(aug_seq_len) or seq_len


def _aug_too_long(example: Mapping[str, Any], name: str, needed: int,
                  aug_len: int, aug_seq_len: int, field: str) -> ValueError:
  shown = f'{field}={aug_seq_len}' + (
      '' if aug_seq_len else f' (0: data.seq_len, {aug_len})')
  return ValueError(
      f'{shown} is too short: an example needs {needed} positions of '
      f'augmenting model {name!r}\'s stream (its BOS + prompt + target '
      f'tokens). Raise {field} to at least {needed}. Example prompt: '
      f'{_text(example["prompt"])!r}.')


def _check_aug_fits(example: Mapping[str, Any], aligned: AugTokenizers,
                    aug_len: int, aug_seq_len: int, field: str) -> None:
  """Raises the aug_seq_len error if a stream of `example` is too long
  (tokenizes only; no alignment)."""
  prompt, target = _text(example['prompt']), _text(example['target'])
  for name, tok in aligned.items():
    needed = 1 + len(tok.encode(prompt)) + len(tok.encode(target))
    if needed > aug_len:
      raise _aug_too_long(example, name, needed, aug_len, aug_seq_len, field)


def _aug_fields(name: str, aligned_: align.Aligned, drop_bos: bool = False
                ) -> Batch:
  """One piece's stream of augmenting model `name`, unpadded: its ids, the
  counts of the anchor positions (all but the anchor BOS's with
  `drop_bos`) and its prompt mask (its BOS and prompt tokens)."""
  m = len(aligned_.ids)
  counts = aligned_.counts[1:] if drop_bos else aligned_.counts
  return {align.key(name, 'inputs'): np.asarray(aligned_.ids, np.int32),
          align.key(name, 'counts'): np.asarray(counts, np.int32),
          align.key(name, 'prompt_mask'): (
              np.arange(m) < max(aligned_.prompt_count, 1)).astype(np.int32)}


def _pad_aug(fields: Mapping[str, np.ndarray], aligned: AugTokenizers,
             seq_len: int, aug_len: int) -> Batch:
  """`_aug_fields` padded: the streams to `aug_len` (the tokenizer's pad
  id, prompt mask 0), the counts to `seq_len` (0)."""
  out = {}
  for name, tok in aligned.items():
    ids = fields[align.key(name, 'inputs')]
    counts = fields[align.key(name, 'counts')]
    inputs = np.full(aug_len, tok.pad_id, np.int32)
    inputs[:len(ids)] = ids
    padded_counts = np.zeros(seq_len, np.int32)
    padded_counts[:len(counts)] = counts
    mask = np.zeros(aug_len, np.int32)
    mask[:len(ids)] = fields[align.key(name, 'prompt_mask')]
    out[align.key(name, 'inputs')] = inputs
    out[align.key(name, 'counts')] = padded_counts
    out[align.key(name, 'prompt_mask')] = mask
  return out


def _aligned_example(example: Mapping[str, Any],
                     tokenizer: tokenizers.Tokenizer, anchor_positions: int,
                     aligned: AugTokenizers, aug_len: int, aug_seq_len: int,
                     field: str) -> Batch:
  """The unpadded streams of a whole example ([BOS] prompt target), each
  checked against `aug_len`; `anchor_positions` is the anchor's input
  count, which the counts must match."""
  prompt, target = _text(example['prompt']), _text(example['target'])
  out: Batch = {}
  for name, tok in aligned.items():
    a = align.align_example(prompt, target, tokenizer, tok)
    if len(a.ids) > aug_len:
      raise _aug_too_long(example, name, len(a.ids), aug_len, aug_seq_len,
                          field)
    if len(a.counts) != anchor_positions:
      raise ValueError(
          f'Alignment of {name!r}: {len(a.counts)} counts for '
          f'{anchor_positions} anchor positions; the anchor tokenizer '
          'encodes the text inconsistently.')
    out.update(_aug_fields(name, a))
  return out


def encode_example(example: Mapping[str, Any], tokenizer: tokenizers.Tokenizer,
                   seq_len: int, seq_len_field: str = 'data.seq_len', *,
                   aligned: AugTokenizers | None = None, aug_seq_len: int = 0,
                   aug_seq_len_field: str = AUG_SEQ_LEN_FIELD) -> Batch:
  """Turns a {'prompt', 'target'} example into fixed-length model inputs.

  tokens = [BOS] + prompt + target + [EOS], padded to seq_len + 1, then
  shifted: `inputs` = tokens[:-1], `targets` = tokens[1:]. `weights` is 1.0
  exactly where `targets` holds a target token or the EOS. `prompt_len`
  (= 1 + len(prompt)) is the number of leading input positions that hold BOS
  and the prompt, i.e. where greedy decoding starts.

  `aligned` adds each augmenting model's stream (module docstring), padded
  to `aug_seq_len` (0: `seq_len`); one longer than that raises, naming
  `aug_seq_len_field`.
  """
  prompt = tokenizer.encode(_text(example['prompt']))
  target = tokenizer.encode(_text(example['target']))
  tokens = [tokenizer.bos_id] + prompt + target + [tokenizer.eos_id]
  if len(tokens) > seq_len + 1:
    raise ValueError(
        f'{seq_len_field}={seq_len} is too short: an example needs '
        f'{len(tokens) - 1} positions ({len(prompt)} prompt + {len(target)} '
        f'target tokens + BOS/EOS). Raise {seq_len_field} to at least '
        f'{len(tokens) - 1}. Example prompt: {_text(example["prompt"])!r}.')
  padded = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
  padded[:len(tokens)] = tokens
  prompt_len = 1 + len(prompt)
  weights = np.zeros(seq_len, np.float32)
  # Position prompt_len - 1 (the last prompt token) predicts the first target
  # token; the last weighted position predicts EOS.
  weights[prompt_len - 1:prompt_len + len(target)] = 1.0
  out = {
      'inputs': padded[:-1],
      'targets': padded[1:],
      'weights': weights,
      'prompt_len': np.int32(prompt_len),
  }
  if aligned is not None:
    aug_len = _aug_len(seq_len, aug_seq_len)
    fields = _aligned_example(example, tokenizer, len(tokens) - 1, aligned,
                              aug_len, aug_seq_len, aug_seq_len_field)
    out.update(_pad_aug(fields, aligned, seq_len, aug_len))
  # Precomputed per-example arrays (cached augmenting states) pass through.
  out.update({k: v for k, v in example.items() if k.startswith(CACHED)})
  return out


def is_document(example: Mapping[str, Any]) -> bool:
  """An example without a prompt: language-model text, weighted throughout
  and cut into rows when longer than one."""
  return not _text(example['prompt'])


def _cut_document(text: str, tokenizer: tokenizers.Tokenizer, seq_len: int,
                  aligned: AugTokenizers, aug_len: int, seq_len_field: str,
                  aug_seq_len_field: str) -> list[str]:
  """A document's text cut into pieces that each fit a row: at most
  `seq_len` anchor positions (the first piece's BOS included) and
  `aug_len` positions of every augmenting stream (its BOS included), each
  piece tokenized on its own.

  Cuts fall between characters, so no token (a byte of a multi-byte
  character) is split across pieces. Each piece is as long as fits,
  estimated from the whole text's tokens and shortened until its own tokens
  fit; with a subword tokenizer among them it then ends after the last
  whitespace in its second half, if any, so that no word is split (a
  subword token is known only once the whitespace after its word is read,
  `calm_jax.data.align`).
  """
  toks = [tokenizer] + list(aligned.values())
  whole = [align.spans(tok, text) for tok in toks]
  if (1 + len(whole[0].ids) <= seq_len
      and all(1 + len(w.ids) <= aug_len for w in whole[1:])):
    return [text]
  words = not all(align.prefix_stable(tok) for tok in toks)

  def fit(c: int, e: int, budgets: list[int], first: bool) -> int:
    """The end, at most e, of a piece from c whose own tokens fit."""
    while True:
      piece = text[c:e]
      ends = []
      for tok, budget in zip(toks, budgets):
        sp = align.spans(tok, piece)
        if len(sp.ids) > budget:
          ends.append(c + (int(sp.floor[budget - 1]) if budget > 0 else 0))
      if not ends:
        return e
      e = min(min(ends), e - 1)
      if e < c or (e == c and not first):
        raise ValueError(
            f'{seq_len_field}={seq_len} / {aug_seq_len_field}={aug_len}: '
            f'a document cannot be cut into rows: the character {c} '
            f'({text[c]!r}) alone needs more positions than a row holds. '
            'Raise them.')

  pieces: list[str] = []
  c = 0
  while c < len(text):
    first = not pieces
    budgets = [seq_len - first] + [aug_len - 1] * (len(toks) - 1)
    # Estimate: the whole text's tokens from c on, as many as fit.
    e = len(text)
    for w, budget in zip(whole, budgets):
      j0 = int(np.searchsorted(w.ceil, c, side='right'))
      if j0 + budget < len(w.ids):
        e = min(e, int(w.floor[j0 + budget - 1]) if budget > 0 else c)
    e = fit(c, max(e, min(c + 1, len(text)) if budgets[0] > 0 else c),
            budgets, first)
    if words and c < e < len(text) and not (
        text[e - 1].isspace() and not text[e].isspace()):
      # Back to the start of the last word, if that keeps half the piece.
      w = e - 1
      while w > c and not (text[w - 1].isspace() and not text[w].isspace()):
        w -= 1
      if w > c and 2 * (w - c) >= e - c:
        e = fit(c, w, budgets, first)
    pieces.append(text[c:e])
    c = e
  return pieces


def _aligned_document_pieces(text: str, tokenizer: tokenizers.Tokenizer,
                             seq_len: int, aligned: AugTokenizers,
                             aug_len: int, seq_len_field: str,
                             aug_seq_len_field: str) -> list[Batch]:
  """`document_pieces` of a document with aligned streams: the text is cut
  (`_cut_document`) and each piece aligned on its own. The anchor tokens are
  [BOS] + the pieces' tokens + [EOS], cut where the pieces meet (targets run
  on into the next piece, as without `aligned`); every piece's stream
  starts with the augmenting BOS, and a later piece, which has no anchor
  BOS, drops that position's count."""
  texts = _cut_document(text, tokenizer, seq_len, aligned, aug_len,
                        seq_len_field, aug_seq_len_field)
  piece_ids = [tokenizer.encode(t) for t in texts]
  keep = [i for i in range(len(texts)) if i == 0 or piece_ids[i]]
  tokens = np.asarray([tokenizer.bos_id] + [t for i in keep
                                            for t in piece_ids[i]]
                      + [tokenizer.eos_id], np.int32)
  pieces = []
  start = 0
  for i in keep:
    n = len(piece_ids[i]) + (i == 0)
    chunk = tokens[start:start + n + 1]
    prompt_mask = np.zeros(n, np.int32)
    prompt_mask[0] = i == 0  # The document's BOS.
    piece = {'inputs': chunk[:-1], 'targets': chunk[1:],
             'weights': np.ones(n, np.float32), 'prompt_mask': prompt_mask}
    for name, tok in aligned.items():
      a = align.align_example('', texts[i], tokenizer, tok)
      if len(a.counts) != 1 + len(piece_ids[i]):
        raise ValueError(
            f'Alignment of {name!r}: {len(a.counts)} counts for '
            f'{1 + len(piece_ids[i])} anchor positions; the anchor '
            'tokenizer encodes the text inconsistently.')
      piece.update(_aug_fields(name, a, drop_bos=i > 0))
    pieces.append(piece)
    start += n
  return pieces


def document_pieces(example: Mapping[str, Any],
                    tokenizer: tokenizers.Tokenizer, seq_len: int,
                    seq_len_field: str = 'data.seq_len',
                    ids: tuple[list[int], list[int]] | None = None, *,
                    aligned: AugTokenizers | None = None,
                    aug_seq_len: int = 0,
                    aug_seq_len_field: str = AUG_SEQ_LEN_FIELD
                    ) -> list[Batch]:
  """An example as variable-length pieces of at most `seq_len` positions.

  Each piece has `inputs`, `targets`, `weights` and `prompt_mask` (1 at BOS
  and prompt positions). A document longer than `seq_len` becomes several
  pieces (each later one continues the text without a BOS); any other
  example is one piece, and one that does not fit raises the
  `encode_example` error. `ids` (the prompt's and the target's token ids)
  skips tokenizing when the caller did it for many examples at once.

  `aligned`: each piece also has, per augmenting model, its unpadded stream
  (`aug/<name>/inputs` and `prompt_mask`, at most `aug_seq_len` long, 0:
  `seq_len`) and the anchor positions' `aug/<name>/counts` (from the
  piece's start); a document is then cut by its text so that every piece
  fits both lengths (`_aligned_document_pieces`).
  """
  prompt, target = ids if ids is not None else (
      tokenizer.encode(_text(example['prompt'])),
      tokenizer.encode(_text(example['target'])))
  tokens = np.asarray([tokenizer.bos_id] + prompt + target +
                      [tokenizer.eos_id], np.int32)
  aug_len = 0 if aligned is None else _aug_len(seq_len, aug_seq_len)
  if prompt:
    if len(tokens) > seq_len + 1:
      encode_example(example, tokenizer, seq_len, seq_len_field)  # Raises.
    n = len(tokens) - 1
    weights = np.zeros(n, np.float32)
    weights[len(prompt):] = 1.0  # From the last prompt token's prediction.
    prompt_mask = (np.arange(n) <= len(prompt)).astype(np.int32)
    piece = {'inputs': tokens[:-1], 'targets': tokens[1:],
             'weights': weights, 'prompt_mask': prompt_mask}
    if aligned is not None:
      piece.update(_aligned_example(example, tokenizer, n, aligned, aug_len,
                                    aug_seq_len, aug_seq_len_field))
    return [piece]
  if aligned is not None:
    return _aligned_document_pieces(_text(example['target']), tokenizer,
                                    seq_len, aligned, aug_len, seq_len_field,
                                    aug_seq_len_field)
  pieces = []
  for start in range(0, len(tokens) - 1, seq_len):
    chunk = tokens[start:start + seq_len + 1]
    n = len(chunk) - 1
    prompt_mask = np.zeros(n, np.int32)
    prompt_mask[0] = start == 0  # The document's BOS.
    pieces.append({'inputs': chunk[:-1], 'targets': chunk[1:],
                   'weights': np.ones(n, np.float32),
                   'prompt_mask': prompt_mask})
  return pieces


def pad_piece(piece: Mapping[str, np.ndarray], seq_len: int, pad_id: int, *,
              aligned: AugTokenizers | None = None, aug_seq_len: int = 0
              ) -> Batch:
  """A piece as a padded row, with the `prompt_len` of its prompt mask
  (and, `aligned`, its streams padded to `aug_seq_len`, 0: `seq_len`)."""
  n = len(piece['inputs'])
  row = {'inputs': np.full(seq_len, pad_id, np.int32),
         'targets': np.full(seq_len, pad_id, np.int32),
         'weights': np.zeros(seq_len, np.float32)}
  for k in row:
    row[k][:n] = piece[k]
  row['prompt_len'] = np.int32(piece['prompt_mask'].sum())
  if aligned is not None:
    row.update(_pad_aug(piece, aligned, seq_len,
                        _aug_len(seq_len, aug_seq_len)))
  return row


def fits(example: Mapping[str, Any], tokenizer: tokenizers.Tokenizer,
         seq_len: int, *, aligned: AugTokenizers | None = None,
         aug_seq_len: int = 0) -> bool:
  """Whether `encode_example` can hold the example in `seq_len` (and its
  `aligned` streams in `aug_seq_len`, 0: `seq_len`)."""
  try:
    encode_example(example, tokenizer, seq_len)
    if aligned is not None:
      _check_aug_fits(example, aligned, _aug_len(seq_len, aug_seq_len),
                      aug_seq_len, AUG_SEQ_LEN_FIELD)
  except ValueError:
    return False
  return True


def check_fits(source: Sequence[Any], tokenizer: tokenizers.Tokenizer,
               seq_len: int, seq_len_field: str,
               documents_fit: bool = False, *,
               aligned: AugTokenizers | None = None, aug_seq_len: int = 0,
               aug_seq_len_field: str = AUG_SEQ_LEN_FIELD) -> None:
  """Raises the `encode_example` error for the first example of `source`
  longer than `seq_len`, before any training; encodes every example once.

  `documents_fit`: examples without a prompt are cut into pieces (packed
  rows), so only prompt/completion examples are checked. `aligned`: each
  augmenting stream is checked against `aug_seq_len` (0: `seq_len`) too,
  naming `aug_seq_len_field`. A `Memoized` source keeps what this reads.
  """
  aug_len = 0 if aligned is None else _aug_len(seq_len, aug_seq_len)
  for _, example in read_examples(source):
    if documents_fit and is_document(example):
      continue
    try:
      encode_example(example, tokenizer, seq_len, seq_len_field)
      if aligned is not None:
        _check_aug_fits(example, aligned, aug_len, aug_seq_len,
                        aug_seq_len_field)
    except ValueError as e:
      origin = example.get('origin') if hasattr(example, 'get') else None
      if origin is None:
        raise
      raise ValueError(f'{_text(origin)}: {e}') from None


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name}={value!r} must be a positive int.')


# Per-token fields of a piece; packing adds `segment_ids` and `positions`.
PACKED_FIELDS = ('inputs', 'targets', 'weights', 'prompt_mask')
# Examples packed together: this many per row of the batch, first-fit.
PACK_BLOCK_PER_ROW = 8


def pack_pieces(pieces: Sequence[Batch], seq_len: int, pad_id: int, *,
                aligned: AugTokenizers | None = None, aug_seq_len: int = 0
                ) -> list[Batch]:
  """First-fit packing: each piece goes into the first row with room.

  Rows hold PACKED_FIELDS plus `segment_ids` (1, 2, ... per piece, 0 for
  padding) and `positions` (restarting at 0 in every piece), in the order
  the rows were opened.

  `aligned`: the pieces carry their streams (`document_pieces`); a row has
  room for a piece only if every stream also fits in `aug_seq_len` (0:
  `seq_len`), and rows carry every stream's fields (module docstring), the
  counts offset by the stream tokens of the row's earlier pieces.
  """
  names = list(aligned or ())
  aug_len = 0 if aligned is None else _aug_len(seq_len, aug_seq_len)
  capacity = [seq_len] + [aug_len] * len(names)
  rows: list[list[Batch]] = []
  space: list[list[int]] = []
  for piece in pieces:
    need = [len(piece['inputs'])] + [
        len(piece[align.key(name, 'inputs')]) for name in names]
    for r, free in enumerate(space):
      if all(n <= f for n, f in zip(need, free)):
        rows[r].append(piece)
        space[r] = [f - n for n, f in zip(need, free)]
        break
    else:
      rows.append([piece])
      space.append([c - n for n, c in zip(need, capacity)])
  out = [_pack_row(row, seq_len, pad_id) for row in rows]
  if aligned is not None:
    for packed, row in zip(out, rows):
      for name, tok in aligned.items():
        packed.update(_pack_stream(row, name, seq_len, aug_len, tok.pad_id))
  return out


def _pack_stream(row: Sequence[Batch], name: str, seq_len: int, aug_len: int,
                 pad_id: int) -> Batch:
  """The fields of augmenting stream `name` of a packed row's pieces."""
  k = functools.partial(align.key, name)
  packed = {k('inputs'): np.full(aug_len, pad_id, np.int32),
            k('counts'): np.zeros(seq_len, np.int32),
            k('prompt_mask'): np.zeros(aug_len, np.int32),
            k('segment_ids'): np.zeros(aug_len, np.int32),
            k('positions'): np.zeros(aug_len, np.int32)}
  offset = aug_offset = 0
  for i, piece in enumerate(row, 1):
    n, m = len(piece['inputs']), len(piece[k('inputs')])
    cut = slice(aug_offset, aug_offset + m)
    packed[k('inputs')][cut] = piece[k('inputs')]
    packed[k('prompt_mask')][cut] = piece[k('prompt_mask')]
    packed[k('segment_ids')][cut] = i
    packed[k('positions')][cut] = np.arange(m)
    packed[k('counts')][offset:offset + n] = piece[k('counts')] + aug_offset
    offset += n
    aug_offset += m
  return packed


def _pack_row(row: Sequence[Batch], seq_len: int, pad_id: int) -> Batch:
  """The anchor fields of a packed row's pieces."""
  packed = {'inputs': np.full(seq_len, pad_id, np.int32),
            'targets': np.full(seq_len, pad_id, np.int32),
            'weights': np.zeros(seq_len, np.float32),
            'prompt_mask': np.zeros(seq_len, np.int32),
            'segment_ids': np.zeros(seq_len, np.int32),
            'positions': np.zeros(seq_len, np.int32)}
  offset = 0
  for i, piece in enumerate(row, 1):
    n = len(piece['inputs'])
    cut = slice(offset, offset + n)
    for k in PACKED_FIELDS:
      packed[k][cut] = piece[k]
    packed['segment_ids'][cut] = i
    packed['positions'][cut] = np.arange(n)
    offset += n
  return packed


class _Rows(grain.experimental.FlatMapTransform):
  """A block's packed rows, one by one (packing ran in a reader thread)."""

  max_fan_out = 1 << 20  # Rows per block; not a limit in practice.

  def flat_map(self, rows):
    return rows


def _pack_block(examples: Sequence[Any], tokenizer: tokenizers.Tokenizer,
                seq_len: int, aligned: AugTokenizers | None = None,
                aug_seq_len: int = 0) -> list[Batch]:
  """A block of examples, tokenized together (one batch call of the
  tokenizer when it has one), as packed rows. (`aligned` streams are
  aligned example by example, `align.align_example`.)"""
  texts = [_text(ex[k]) for ex in examples for k in ('prompt', 'target')]
  batch_encode = getattr(tokenizer, 'encode_batch', None)
  ids = (batch_encode(texts) if batch_encode is not None
         else [tokenizer.encode(t) for t in texts])
  pieces = [p for i, ex in enumerate(examples)
            for p in document_pieces(ex, tokenizer, seq_len,
                                     ids=(ids[2 * i], ids[2 * i + 1]),
                                     aligned=aligned,
                                     aug_seq_len=aug_seq_len)]
  return pack_pieces(pieces, seq_len, tokenizer.pad_id, aligned=aligned,
                     aug_seq_len=aug_seq_len)


# Decoded examples a training source keeps (`Memoized`): the key-value
# splits are 5-40 MB decoded; a corpus larger than this is read from disk
# past it, as it always was.
MEMO_BYTES = 256 * 2**20


# Examples `read_examples` asks a source for at once.
READ_CHUNK = 1024


def read_examples(source: Sequence[Any], indices: Sequence[int] | None = None,
                  chunk: int | None = None):
  """Yields (index, example) for `indices` of `source` (default: all), in
  order, `chunk` at a time through the source's `__getitems__` where it has
  one (`chunk` 0 or None: READ_CHUNK): a TFDS array_record source reads
  1024 records at once ~5x faster than one by one (~0.1 against ~0.5 ms an
  example, decoding included)."""
  indices = range(len(source)) if indices is None else indices
  chunk = chunk or READ_CHUNK
  many = getattr(source, '__getitems__', None)
  if many is None:
    for i in indices:
      yield i, source[i]
    return
  for start in range(0, len(indices), chunk):
    part = [int(i) for i in indices[start:start + chunk]]
    yield from zip(part, many(part))


class Memoized(Sequence):
  """A random-access source that keeps each example it has decoded, up to
  `max_bytes` of their values, so that later epochs skip the decoding.

  Reading a record back from a TFDS data source (array_record + feature
  decoding) is ~90 us; a training run reads the key-value splits 5-17
  times over. Grain's reader threads share it: two of them decoding the
  same index at once both store the same example.
  """

  def __init__(self, source: Sequence[Any], max_bytes: int | None = None):
    self._source, self._bytes = source, 0
    self._max_bytes = MEMO_BYTES if max_bytes is None else max_bytes
    self._len = len(source)
    self._kept: dict[int, Any] = {}  # Only what it holds: a corpus can be huge.

  def __len__(self) -> int:
    return self._len

  def fits(self, sample: int = 16) -> bool:
    """Whether all examples would fit the budget, judged from `sample`
    examples spread over the source (decoded, and kept if they fit)."""
    n = len(self)
    seen = [_nbytes(self[i]) for i in range(0, n, max(1, n // sample))]
    return sum(seen) / max(len(seen), 1) * n <= self._max_bytes

  def __getitem__(self, index):
    index = int(index)
    example = self._kept.get(index)
    if example is None:
      example = self._keep(index, self._source[index])
    return example

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    """`[self[i] for i in indices]`, the ones not kept yet read from the
    source in one bulk read (`read_examples`)."""
    got = {i: self._kept[i] for i in map(int, indices) if i in self._kept}
    missing = [int(i) for i in indices if int(i) not in got]
    for i, example in read_examples(self._source, missing, len(missing) or 1):
      got[i] = self._keep(i, example)
    return [got[int(i)] for i in indices]

  def preload(self, indices: Sequence[int] | None = None) -> None:
    """Reads the examples at `indices` (default: all) not kept yet in bulk,
    stopping at the budget, so that the first epoch is not read one example
    at a time."""
    indices = range(self._len) if indices is None else indices
    missing = [int(i) for i in indices if int(i) not in self._kept]
    for start in range(0, len(missing), READ_CHUNK):
      if self._bytes >= self._max_bytes:
        return
      self.__getitems__(missing[start:start + READ_CHUNK])

  def _keep(self, index: int, example: Any) -> Any:
    if self._bytes < self._max_bytes and index not in self._kept:
      self._kept[index] = example
      self._bytes += _nbytes(example)
    return example


def _nbytes(example: Mapping[str, Any]) -> int:
  return sum(len(v) if isinstance(v, (bytes, str)) else getattr(v, 'nbytes', 8)
             for v in example.values())


def train_dataset(source: Sequence[Any], *, tokenizer: tokenizers.Tokenizer,
                  seq_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1,
                  pack: bool = False, num_threads: int = 4,
                  prefetch_buffer_size: int = 256,
                  aligned: AugTokenizers | None = None,
                  aug_seq_len: int = 0) -> grain.IterDataset:
  """Infinite, shuffled, per-process training batches from `source`.

  `source` is any random-access sequence (e.g. a TFDS data source). Process
  `shard_index` reads the disjoint slice `source[shard_index::shard_count]`;
  the slice is shuffled with `seed` and reshuffled each epoch. Batches are
  dicts of `inputs`, `targets`, `weights` [batch_size, seq_len] and
  `prompt_len` [batch_size]; packed (`pack=True`), of `inputs`, `targets`,
  `weights`, `prompt_mask`, `segment_ids` and `positions` [batch_size,
  seq_len] (first-fit packing of PACK_BLOCK_PER_ROW x batch_size examples
  at a time). `iter()` of
  the result is a checkpointable `grain.DatasetIterator` (see the module
  docstring).

  `aligned` (augmenting model name -> tokenizer) adds each model's stream
  of the same text, `aug/<name>/...` (module docstring), [batch_size,
  aug_seq_len] (0: seq_len) and counts [batch_size, seq_len]; packed rows
  have room for a piece only where every stream fits too.
  """
  _check_positive('data.seq_len', seq_len)
  if aligned is not None:
    _aug_len(seq_len, aug_seq_len)
  _check_positive('batch_size', batch_size)
  _check_positive('shard_count', shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, '
                     f'shard_count={shard_count}).')
  # A source `Data.train` checked is already a Memoized holding the split.
  memo = source if isinstance(source, Memoized) else Memoized(source)
  ds = grain.MapDataset.source(memo)
  # Shard before shuffling so processes never share an example, whatever the
  # epoch's permutation.
  ds = ds[shard_index::shard_count]
  if len(ds) < (1 if pack else batch_size):
    raise ValueError(
        f'Process shard {shard_index}/{shard_count} holds {len(ds)} examples, '
        f'fewer than one batch of {batch_size}; lower the batch size or use a '
        'larger split.')
  ds = ds.shuffle(seed=seed).repeat()  # Epoch e is shuffled with (seed, e).
  if not pack:
    ds = ds.map(functools.partial(
        encode_example, tokenizer=tokenizer, seq_len=seq_len,
        aligned=aligned, aug_seq_len=aug_seq_len))
    if not aligned and memo.fits():
      # A split that stays in memory is read in the calling thread: handing
      # each example to a reader thread cost 3.3 ms of CPU per batch of 32
      # against 0.9 ms here, once decoded (the state checkpointed is the same).
      # It is read whole now, in bulk, rather than an example at a time
      # through the first epoch.
      num_threads = prefetch_buffer_size = 0
      memo.preload(range(shard_index, len(memo), shard_count))
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    return ds.batch(batch_size, drop_remainder=True)
  # Packed: blocks of examples are tokenized, cut into pieces and packed
  # first-fit in grain's reader threads; the rows then come out one by one.
  ds = ds.batch(PACK_BLOCK_PER_ROW * batch_size, batch_fn=list)
  ds = ds.map(functools.partial(_pack_block, tokenizer=tokenizer,
                                seq_len=seq_len, aligned=aligned,
                                aug_seq_len=aug_seq_len))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=min(
          prefetch_buffer_size, 16)))
  ds = grain.experimental.FlatMapIterDataset(ds, _Rows())
  return ds.batch(batch_size, drop_remainder=True)


def eval_batches(source: Sequence[Any], *, tokenizer: tokenizers.Tokenizer,
                 seq_len: int, batch_size: int,
                 num_examples: int | None = None,
                 aligned: AugTokenizers | None = None,
                 aug_seq_len: int = 0) -> list[Batch]:
  """The first `num_examples` examples of `source` (all if None), batched.

  Order is the source order; a document longer than `seq_len` fills several
  rows (for the loss; nothing decodes a document). The last batch is padded to `batch_size` with
  rows that hold only BOS (`prompt_len` 1), zero weights and `valid` False,
  so every batch has one shape and metrics divide by `valid.sum()`. Besides
  the training fields, each batch has `valid` (bool [B]), and for every text
  field `f` of the examples (`prompt`, `target`, ...) an `f_text` column
  (object [B], '' for padding) for the metrics. `aligned` adds each
  augmenting model's padded stream (`encode_example`; a padding row's holds
  its BOS, read by the anchor's BOS).
  """
  _check_positive('batch_size', batch_size)
  n = len(source)
  if num_examples is not None:
    if num_examples < 0:
      raise ValueError(f'num_examples={num_examples} must be >= 0 or None.')
    n = min(n, num_examples)
  rows = []
  for i in range(n):
    example = source[i]
    if is_document(example):  # Possibly several rows, for the loss.
      pieces = [pad_piece(p, seq_len, tokenizer.pad_id, aligned=aligned,
                          aug_seq_len=aug_seq_len)
                for p in document_pieces(example, tokenizer, seq_len,
                                         aligned=aligned,
                                         aug_seq_len=aug_seq_len)]
    else:
      pieces = [encode_example(example, tokenizer, seq_len, aligned=aligned,
                               aug_seq_len=aug_seq_len)]
    for row in pieces:
      row['valid'] = np.bool_(True)
      # Every text field rides along as `<field>_text` (target, prompt, and
      # whatever a metric needs: a language, a doctest, a module name).
      for name, value in example.items():
        if not name.startswith(CACHED) and _is_text(value):
          row[f'{name}_text'] = _text(value)
      rows.append(row)
  n = len(rows)
  pad = encode_example({'prompt': '', 'target': ''}, tokenizer, seq_len,
                       aligned=aligned, aug_seq_len=aug_seq_len)
  pad['weights'][:] = 0.0
  pad['targets'][:] = tokenizer.pad_id  # Drop the EOS of the empty target.
  pad['valid'] = np.bool_(False)
  for name in rows[0] if rows else ('target_text', 'prompt_text'):
    if name.endswith('_text'):
      pad[name] = ''

  batches = []
  for start in range(0, n, batch_size):
    chunk = rows[start:start + batch_size]
    chunk += [pad] * (batch_size - len(chunk))
    batch = {}
    for name in chunk[0]:
      values = [row[name] for row in chunk]
      if name.endswith('_text'):
        batch[name] = np.empty(batch_size, dtype=object)
        batch[name][:] = values
      else:
        batch[name] = np.stack(values)
    batches.append(batch)
  return batches


# --------------------------------------------------------------------------
# Sources by name (config field `data.dataset`).


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset `data.dataset` can name: its splits, config check and source.

  `check(data_cfg)` validates `config.data` without building anything;
  `source(split, data_cfg, data_dir, split_field)` prepares the TFDS data
  under `data_dir` on first use and returns the split's random-access source.
  """
  splits: tuple[str, ...]
  check: Callable[[ml_collections.ConfigDict], Any]
  source: Callable[..., Sequence[Any]]
  # Eval splits whose examples that do not fit data.seq_len are left out
  # (and counted) instead of refused.
  fit_to_seq_len: tuple[str, ...] = ()
  # check_split(split, data_cfg, field): refuses a split of `splits` that
  # this data config leaves out; checked with the config, before anything
  # is built.
  check_split: Callable[[str, ml_collections.ConfigDict, str], None] = (
      lambda split, data_cfg, field: None)


def _module_spec(module: str) -> DatasetSpec:
  """The spec of a dataset module exposing SPLITS (or ALL_SPLITS),
  check_data_config, source and optionally FIT_TO_SEQ_LEN and check_split.

  Imported on first use, so that a key-value run never imports Django's
  catalogs or the code corpus.
  """
  mod = importlib.import_module(module)
  spec = DatasetSpec(tuple(getattr(mod, 'ALL_SPLITS', mod.SPLITS)),
                     mod.check_data_config, mod.source,
                     tuple(getattr(mod, 'FIT_TO_SEQ_LEN', ())))
  if hasattr(mod, 'check_split'):
    spec = dataclasses.replace(spec, check_split=mod.check_split)
  return spec


# data.dataset -> the module that defines it. A new dataset is a module
# with the interface of `_module_spec` and a line here.
DATASETS: dict[str, str] = {
    'kv_arithmetic': 'calm_jax.data.kv_arithmetic',
    'code_corpus': 'calm_jax.data.code_corpus',
    'ntl_catalogs': 'calm_jax.data.ntl',
    # Your own data (calm_jax/data/files.py).
    'jsonl': 'calm_jax.data.files',
    'text': 'calm_jax.data.files',
    'tfds': 'calm_jax.data.files',
}
# The datasets that read `data.train` / `data.eval`.
USER_DATASETS = files.FORMATS


def dataset_spec(dataset: str) -> DatasetSpec:
  """The registered dataset `dataset` (config field `data.dataset`)."""
  if dataset not in DATASETS:
    raise ValueError(
        f'Unknown dataset data.dataset={dataset!r}. Known datasets: '
        f'{sorted(DATASETS)}. Set config.data.dataset to one of them.')
  return _module_spec(DATASETS[dataset])


def make_source(dataset: str, split: str, data_cfg: ml_collections.ConfigDict,
                data_dir: str, *, split_field: str = 'train.split'
                ) -> Sequence[Any]:
  """Prepares `dataset` under `data_dir` if needed; returns a split source.

  The result is a random-access sequence of examples (dicts of bytes) for
  `train_dataset` / `eval_batches`. `split_field` names the config field the
  split came from, for the error message.
  """
  return dataset_spec(dataset).source(split, data_cfg, data_dir, split_field)
