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

from calm_jax.data import files
from calm_jax.data import tokenizers

Batch = dict[str, np.ndarray]


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


def encode_example(example: Mapping[str, Any], tokenizer: tokenizers.Tokenizer,
                   seq_len: int, seq_len_field: str = 'data.seq_len') -> Batch:
  """Turns a {'prompt', 'target'} example into fixed-length model inputs.

  tokens = [BOS] + prompt + target + [EOS], padded to seq_len + 1, then
  shifted: `inputs` = tokens[:-1], `targets` = tokens[1:]. `weights` is 1.0
  exactly where `targets` holds a target token or the EOS. `prompt_len`
  (= 1 + len(prompt)) is the number of leading input positions that hold BOS
  and the prompt, i.e. where greedy decoding starts.
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
  # Precomputed per-example arrays (cached augmenting states) pass through.
  out.update({k: v for k, v in example.items() if k.startswith(CACHED)})
  return out


def is_document(example: Mapping[str, Any]) -> bool:
  """An example without a prompt: language-model text, weighted throughout
  and cut into rows when longer than one."""
  return not _text(example['prompt'])


def document_pieces(example: Mapping[str, Any],
                    tokenizer: tokenizers.Tokenizer, seq_len: int,
                    seq_len_field: str = 'data.seq_len',
                    ids: tuple[list[int], list[int]] | None = None
                    ) -> list[Batch]:
  """An example as variable-length pieces of at most `seq_len` positions.

  Each piece has `inputs`, `targets`, `weights` and `prompt_mask` (1 at BOS
  and prompt positions). A document longer than `seq_len` becomes several
  pieces (each later one continues the text without a BOS); any other
  example is one piece, and one that does not fit raises the
  `encode_example` error. `ids` (the prompt's and the target's token ids)
  skips tokenizing when the caller did it for many examples at once.
  """
  prompt, target = ids if ids is not None else (
      tokenizer.encode(_text(example['prompt'])),
      tokenizer.encode(_text(example['target'])))
  tokens = np.asarray([tokenizer.bos_id] + prompt + target +
                      [tokenizer.eos_id], np.int32)
  if prompt:
    if len(tokens) > seq_len + 1:
      encode_example(example, tokenizer, seq_len, seq_len_field)  # Raises.
    n = len(tokens) - 1
    weights = np.zeros(n, np.float32)
    weights[len(prompt):] = 1.0  # From the last prompt token's prediction.
    prompt_mask = (np.arange(n) <= len(prompt)).astype(np.int32)
    return [{'inputs': tokens[:-1], 'targets': tokens[1:],
             'weights': weights, 'prompt_mask': prompt_mask}]
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


def pad_piece(piece: Mapping[str, np.ndarray], seq_len: int, pad_id: int
              ) -> Batch:
  """A piece as a padded row, with the `prompt_len` of its prompt mask."""
  n = len(piece['inputs'])
  row = {'inputs': np.full(seq_len, pad_id, np.int32),
         'targets': np.full(seq_len, pad_id, np.int32),
         'weights': np.zeros(seq_len, np.float32)}
  for k in row:
    row[k][:n] = piece[k]
  row['prompt_len'] = np.int32(piece['prompt_mask'].sum())
  return row


def fits(example: Mapping[str, Any], tokenizer: tokenizers.Tokenizer,
         seq_len: int) -> bool:
  """Whether `encode_example` can hold the example in `seq_len`."""
  try:
    encode_example(example, tokenizer, seq_len)
  except ValueError:
    return False
  return True


def check_fits(source: Sequence[Any], tokenizer: tokenizers.Tokenizer,
               seq_len: int, seq_len_field: str,
               documents_fit: bool = False) -> None:
  """Raises the `encode_example` error for the first example of `source`
  longer than `seq_len`, before any training; encodes every example once.

  `documents_fit`: examples without a prompt are cut into pieces (packed
  rows), so only prompt/completion examples are checked.
  """
  for i in range(len(source)):
    example = source[i]
    if documents_fit and is_document(example):
      continue
    try:
      encode_example(example, tokenizer, seq_len, seq_len_field)
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


def pack_pieces(pieces: Sequence[Batch], seq_len: int, pad_id: int
                ) -> list[Batch]:
  """First-fit packing: each piece goes into the first row with room.

  Rows hold PACKED_FIELDS plus `segment_ids` (1, 2, ... per piece, 0 for
  padding) and `positions` (restarting at 0 in every piece), in the order
  the rows were opened.
  """
  rows: list[list[Batch]] = []
  space: list[int] = []
  for piece in pieces:
    n = len(piece['inputs'])
    for r, free in enumerate(space):
      if n <= free:
        rows[r].append(piece)
        space[r] -= n
        break
    else:
      rows.append([piece])
      space.append(seq_len - n)
  out = []
  for row in rows:
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
    out.append(packed)
  return out


class _Rows(grain.experimental.FlatMapTransform):
  """A block's packed rows, one by one (packing ran in a reader thread)."""

  max_fan_out = 1 << 20  # Rows per block; not a limit in practice.

  def flat_map(self, rows):
    return rows


def _pack_block(examples: Sequence[Any], tokenizer: tokenizers.Tokenizer,
                seq_len: int) -> list[Batch]:
  """A block of examples, tokenized together (one batch call of the
  tokenizer when it has one), as packed rows."""
  texts = [_text(ex[k]) for ex in examples for k in ('prompt', 'target')]
  batch_encode = getattr(tokenizer, 'encode_batch', None)
  ids = (batch_encode(texts) if batch_encode is not None
         else [tokenizer.encode(t) for t in texts])
  pieces = [p for i, ex in enumerate(examples)
            for p in document_pieces(ex, tokenizer, seq_len,
                                     ids=(ids[2 * i], ids[2 * i + 1]))]
  return pack_pieces(pieces, seq_len, tokenizer.pad_id)


def train_dataset(source: Sequence[Any], *, tokenizer: tokenizers.Tokenizer,
                  seq_len: int, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1,
                  pack: bool = False, num_threads: int = 4,
                  prefetch_buffer_size: int = 256) -> grain.IterDataset:
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
  """
  _check_positive('data.seq_len', seq_len)
  _check_positive('batch_size', batch_size)
  _check_positive('shard_count', shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, '
                     f'shard_count={shard_count}).')
  ds = grain.MapDataset.source(source)
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
        encode_example, tokenizer=tokenizer, seq_len=seq_len))
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    return ds.batch(batch_size, drop_remainder=True)
  # Packed: blocks of examples are tokenized, cut into pieces and packed
  # first-fit in grain's reader threads; the rows then come out one by one.
  ds = ds.batch(PACK_BLOCK_PER_ROW * batch_size, batch_fn=list)
  ds = ds.map(functools.partial(_pack_block, tokenizer=tokenizer,
                                seq_len=seq_len))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=min(
          prefetch_buffer_size, 16)))
  ds = grain.experimental.FlatMapIterDataset(ds, _Rows())
  return ds.batch(batch_size, drop_remainder=True)


def eval_batches(source: Sequence[Any], *, tokenizer: tokenizers.Tokenizer,
                 seq_len: int, batch_size: int,
                 num_examples: int | None = None) -> list[Batch]:
  """The first `num_examples` examples of `source` (all if None), batched.

  Order is the source order; a document longer than `seq_len` fills several
  rows (for the loss; nothing decodes a document). The last batch is padded to `batch_size` with
  rows that hold only BOS (`prompt_len` 1), zero weights and `valid` False,
  so every batch has one shape and metrics divide by `valid.sum()`. Besides
  the training fields, each batch has `valid` (bool [B]), and for every text
  field `f` of the examples (`prompt`, `target`, ...) an `f_text` column
  (object [B], '' for padding) for the metrics.
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
      pieces = [pad_piece(p, seq_len, tokenizer.pad_id)
                for p in document_pieces(example, tokenizer, seq_len)]
    else:
      pieces = [encode_example(example, tokenizer, seq_len)]
    for row in pieces:
      row['valid'] = np.bool_(True)
      # Every text field rides along as `<field>_text` (target, prompt, and
      # whatever a metric needs: a language, a doctest, a module name).
      for name, value in example.items():
        if not name.startswith(CACHED) and _is_text(value):
          row[f'{name}_text'] = _text(value)
      rows.append(row)
  n = len(rows)
  pad = encode_example({'prompt': '', 'target': ''}, tokenizer, seq_len)
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


def _module_spec(module: str) -> DatasetSpec:
  """The spec of a dataset module exposing SPLITS (or ALL_SPLITS),
  check_data_config, source and optionally FIT_TO_SEQ_LEN.

  Imported on first use, so that a key-value run never imports Django's
  catalogs or the code corpus.
  """
  mod = importlib.import_module(module)
  return DatasetSpec(tuple(getattr(mod, 'ALL_SPLITS', mod.SPLITS)),
                     mod.check_data_config, mod.source,
                     tuple(getattr(mod, 'FIT_TO_SEQ_LEN', ())))


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
