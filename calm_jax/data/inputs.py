"""The data an experiment needs, by config: sources, iterators, eval sets.

`Data(config.data, workdir)` is what the trainer holds: it prepares TFDS
datasets under the workdir on first use, hands out per-process training
iterators for a split, and builds (once) the padded eval batches of a split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from calm_jax.data import align
from calm_jax.data import files
from calm_jax.data import pipeline
from calm_jax.data import tokenizers

# Batch entries the models read, where a batch has them (padded rows carry
# `prompt_len`, packed rows `prompt_mask`, `segment_ids` and `positions`);
# the rest (texts, masks) is for scoring.
MODEL_KEYS = ('inputs', 'targets', 'weights', 'prompt_len', 'prompt_mask',
              'segment_ids', 'positions')
# Prefix of precomputed per-example arrays the models also read.
CACHED = pipeline.CACHED


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The entries of `batch` a model reads (MODEL_KEYS, cached states and
  aligned augmenting streams)."""
  return {k: v for k, v in batch.items()
          if k in MODEL_KEYS or k.startswith((CACHED, align.PREFIX))}


def split_names(dataset: str) -> list[str]:
  return list(pipeline.dataset_spec(dataset).splits)


def check_split(data_cfg: ml_collections.ConfigDict, split: str,
                field: str) -> None:
  """Refuses a split that `config.data` leaves out (e.g. an eval split of
  examples its dataset only makes when a field asks for them)."""
  pipeline.dataset_spec(data_cfg.dataset).check_split(split, data_cfg, field)


def validate_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Checks `config.data` without building anything.

  `data.tokenizer` must already be resolved (`config_lib.resolve`): a name
  or a path, never '' or 'anchor'.
  """
  spec = pipeline.dataset_spec(data_cfg.dataset)
  tokenizers.get_tokenizer(data_cfg.tokenizer)
  if not isinstance(data_cfg.seq_len, int) or data_cfg.seq_len <= 1:
    raise ValueError(f'data.seq_len must be an int >= 2, got '
                     f'{data_cfg.seq_len!r}.')
  aug_len = data_cfg.get('aug_seq_len', 0)
  if not isinstance(aug_len, int) or isinstance(aug_len, bool) or aug_len < 0:
    raise ValueError(f'data.aug_seq_len={aug_len!r} must be an int >= 0 (0: '
                     'data.seq_len).')
  pack = data_cfg.get('pack', False)
  if not isinstance(pack, bool):
    raise ValueError(f'data.pack={pack!r} must be True or False.')
  if data_cfg.dataset not in pipeline.USER_DATASETS:
    for field in ('train', 'eval'):
      if data_cfg.get(field, ''):
        raise ValueError(
            f'data.{field}={data_cfg[field]!r} is read only by data.dataset '
            f'in {list(pipeline.USER_DATASETS)}, not by '
            f'{data_cfg.dataset!r}, whose splits are its own; compose on '
            'your own files with experiments/compose.py, or set '
            f"data.{field}=''.")
  spec.check(data_cfg)


@dataclasses.dataclass
class TrainData:
  """One training split; `iterator` gives this process's batches."""
  source: Sequence[Any]
  tokenizer: tokenizers.Tokenizer
  seq_len: int
  pack: bool = False
  # Aligned streams: {augmenting model: its tokenizer} (None: one stream),
  # each row of them `aug_seq_len` long.
  aligned: Mapping[str, tokenizers.Tokenizer] | None = None
  aug_seq_len: int = 0

  def iterator(self, global_batch_size: int, seed: int):
    """A checkpointable grain iterator of this process's share of batches."""
    per_process, rem = divmod(global_batch_size, jax.process_count())
    if rem:
      raise ValueError(
          f'batch_size={global_batch_size} is not divisible by the '
          f'{jax.process_count()} processes; use a multiple of it.')
    return iter(pipeline.train_dataset(
        self.source, tokenizer=self.tokenizer, seq_len=self.seq_len,
        batch_size=per_process, seed=seed, pack=self.pack,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        **self._aligned_kw()))

  def _aligned_kw(self) -> dict[str, Any]:
    if not self.aligned:
      return {}
    return {'aligned': self.aligned,
            'aug_seq_len': self.aug_seq_len or self.seq_len}


class Data:
  """Datasets of one experiment, prepared under `data.data_dir`.

  `aligned` ({augmenting model: tokenizer}) adds each augmenting model's
  own token stream to every batch, aligned to the anchor's by characters
  (calm_jax/data/align.py), `data.aug_seq_len` tokens per row.
  """

  def __init__(self, data_cfg: ml_collections.ConfigDict, workdir: str,
               aligned: Mapping[str, tokenizers.Tokenizer] | None = None):
    validate_config(data_cfg)
    self.config = data_cfg
    self.workdir = workdir
    self.data_dir = data_cfg.data_dir or os.path.join(workdir, 'tfds')
    self.tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
    self.pack = bool(data_cfg.get('pack', False))
    self.aligned = dict(aligned) if aligned else None
    self._eval: dict[tuple[str, int, int], list[dict[str, np.ndarray]]] = {}
    self._train_sources: dict[str, pipeline.Memoized] = {}
    self._checked: set[tuple[str, int]] = set()  # (split, seq_len) that fit.

  def with_tokenizer(self, spec: str) -> 'Data':
    """The same datasets read with another tokenizer, one stream (e.g. to
    pretrain an augmenting model on its own ids)."""
    cfg = ml_collections.ConfigDict(self.config.to_dict())
    cfg.tokenizer = spec
    return Data(cfg, self.workdir)

  def _aligned_kw(self, seq_len: int) -> dict[str, Any]:
    if not self.aligned:
      return {}
    return {'aligned': self.aligned,
            'aug_seq_len': self.config.get('aug_seq_len', 0) or seq_len}

  def source(self, split: str, field: str = 'train.split') -> Sequence[Any]:
    return pipeline.make_source(self.config.dataset, split, self.config,
                                self.data_dir, split_field=field)

  def train(self, split: str, field: str = 'train.split', seq_len: int = 0,
            seq_len_field: str = '') -> TrainData:
    """`split` at `seq_len` tokens per example (0: data.seq_len).

    A shorter `seq_len` is checked against every example of the split here,
    so a too-short value fails naming `seq_len_field` before training.
    """
    # One decoded copy per split, shared by the check below, the training
    # iterators and every row of this process.
    if split not in self._train_sources:
      self._train_sources[split] = pipeline.Memoized(self.source(split, field))
    source = self._train_sources[split]
    checked = (split, seq_len or self.config.seq_len)
    if checked in self._checked:
      pass
    elif self.config.dataset in pipeline.USER_DATASETS:
      # Your own examples may be of any length: all are checked (documents
      # are cut into rows when packed), naming the first that does not fit.
      if not (self.pack and files.documents_only(self.config)):
        pipeline.check_fits(source, self.tokenizer,
                            seq_len or self.config.seq_len,
                            seq_len_field or 'data.seq_len',
                            documents_fit=self.pack,
                            **self._aligned_kw(seq_len or
                                               self.config.seq_len))
    elif (seq_len and seq_len < self.config.seq_len) or self.aligned:
      pipeline.check_fits(source, self.tokenizer,
                          seq_len or self.config.seq_len,
                          seq_len_field or 'data.seq_len',
                          documents_fit=self.pack,
                          **self._aligned_kw(seq_len or self.config.seq_len))
    self._checked.add(checked)
    kw = self._aligned_kw(seq_len or self.config.seq_len)
    return TrainData(source, self.tokenizer, seq_len or self.config.seq_len,
                     pack=self.pack, aligned=kw.get('aligned'),
                     aug_seq_len=kw.get('aug_seq_len', 0))

  def eval(self, split: str, batch_size: int, num_examples: int = 0,
           metric: str = 'loss') -> list[dict[str, np.ndarray]]:
    """Padded eval batches of `split` (first `num_examples`; 0: all).

    Every process holds the whole eval set and contributes its slice of
    each batch, so scoring needs no gather. A `metric` other than 'loss'
    decodes completions of prompts, so a split of documents (no prompts)
    is refused for it.
    """
    key = (split, batch_size, num_examples)
    if key not in self._eval:
      source = self.source(split, 'eval.splits')
      if split in pipeline.dataset_spec(self.config.dataset).fit_to_seq_len:
        kept = [example for _, example in pipeline.read_examples(source)
                if pipeline.fits(example, self.tokenizer, self.config.seq_len,
                                 **self._aligned_kw(self.config.seq_len))]
        logging.info('%s: %d of %d examples fit data.seq_len=%d with this '
                     'tokenizer; the others are left out.', split,
                     len(kept), len(source), self.config.seq_len)
        if not kept:
          raise ValueError(
              f'eval.splits: no example of {split!r} fits data.seq_len='
              f'{self.config.seq_len}; raise data.seq_len or drop the split.')
        source = kept
      n = len(source) if not num_examples else min(num_examples,
                                                     len(source))
      # The n examples scored, read once (in bulk from a TFDS source).
      source = [example for _, example in pipeline.read_examples(
          source, range(n))]
      if metric != 'loss' and any(map(pipeline.is_document, source)):
        raise ValueError(
            f'eval.metrics.{split}={metric!r} scores completions of '
            f'prompts, but split {split!r} holds documents without a '
            f'prompt (e.g. {_origin(source, n)}); set eval.metrics.{split}='
            "'loss', or give prompt/completion examples.")
      needed = {'pass_at_k': ('tests', 'entry_point'),
                'pass_rate': ('tests', 'module', 'name')}.get(metric, ())
      missing = [f for f in needed if n and f not in source[0]]
      if missing:
        raise ValueError(
            f'eval.metrics.{split}={metric!r} runs each example\'s tests, '
            f'but split {split!r} has no {missing} fields (its fields: '
            f'{sorted(source[0])}); choose another metric for it.')
      batches = pipeline.eval_batches(
          source, tokenizer=self.tokenizer,
          seq_len=self.config.seq_len, batch_size=batch_size,
          num_examples=num_examples or None,
          **self._aligned_kw(self.config.seq_len))
      self._eval[key] = batches
    return self._eval[key]


def _origin(source: Sequence[Any], n: int) -> str:
  for i in range(n):
    if pipeline.is_document(source[i]):
      example = source[i]
      origin = example.get('origin') if hasattr(example, 'get') else None
      return pipeline._text(origin) if origin is not None else f'example {i}'
  return 
