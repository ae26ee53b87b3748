"""The data an experiment needs, by config: sources, iterators, eval sets.

`Data(config.data, workdir)` is what the trainer holds: it prepares TFDS
datasets under the workdir on first use, hands out per-process training
iterators for a split, and builds (once) the padded eval batches of a split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from calm_jax.data import pipeline
from calm_jax.data import tokenizers

# Batch entries the models read; the rest (texts, masks) is for scoring.
MODEL_KEYS = ('inputs', 'targets', 'weights', 'prompt_len')
# Prefix of precomputed per-example arrays the models also read.
CACHED = pipeline.CACHED

def split_names(dataset: str) -> list[str]:
  return list(pipeline.dataset_spec(dataset).splits)


def tokenizer_vocab_size(name: str) -> int:
  return tokenizers.get_tokenizer(name).vocab_size


def validate_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Checks `config.data` without building anything."""
  spec = pipeline.dataset_spec(data_cfg.dataset)
  tokenizers.get_tokenizer(data_cfg.tokenizer)
  if int(data_cfg.seq_len) <= 1:
    raise ValueError(f'data.seq_len must be at least 2, got '
                     f'{data_cfg.seq_len}.')
  spec.check(data_cfg)


@dataclasses.dataclass
class TrainData:
  """One training split; `iterator` gives this process's batches."""
  source: Sequence[Any]
  tokenizer: tokenizers.Tokenizer
  seq_len: int

  def iterator(self, global_batch_size: int, seed: int):
    """A checkpointable grain iterator of this process's share of batches."""
    per_process, rem = divmod(global_batch_size, jax.process_count())
    if rem:
      raise ValueError(
          f'batch_size={global_batch_size} is not divisible by the '
          f'{jax.process_count()} processes; use a multiple of it.')
    return iter(pipeline.train_dataset(
        self.source, tokenizer=self.tokenizer, seq_len=self.seq_len,
        batch_size=per_process, seed=seed,
        shard_index=jax.process_index(), shard_count=jax.process_count()))


class Data:
  """Datasets of one experiment, prepared under `data.data_dir`."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, workdir: str):
    validate_config(data_cfg)
    self.config = data_cfg
    self.data_dir = data_cfg.data_dir or os.path.join(workdir, 'tfds')
    self.tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)
    self._eval: dict[tuple[str, int, int], list[dict[str, np.ndarray]]] = {}

  def source(self, split: str, field: str = 'train.split') -> Sequence[Any]:
    return pipeline.make_source(self.config.dataset, split, self.config,
                                self.data_dir, split_field=field)

  def train(self, split: str, field: str = 'train.split', seq_len: int = 0,
            seq_len_field: str = '') -> TrainData:
    """`split` at `seq_len` tokens per example (0: data.seq_len).

    A shorter `seq_len` is checked against every example of the split here,
    so a too-short value fails naming `seq_len_field` before training.
    """
    source = self.source(split, field)
    if seq_len and seq_len < self.config.seq_len:
      pipeline.check_fits(source, self.tokenizer, seq_len, seq_len_field)
    return TrainData(source, self.tokenizer, seq_len or self.config.seq_len)

  def eval(self, split: str, batch_size: int, num_examples: int = 0
           ) -> list[dict[str, np.ndarray]]:
    """Padded eval batches of `split` (first `num_examples`; 0: all).

    Every process holds the whole eval set and contributes its slice of
    each batch, so scoring needs no gather.
    """
    key = (split, batch_size, num_examples)
    if key not in self._eval:
      batches = pipeline.eval_batches(
          self.source(split, 'eval.splits'), tokenizer=self.tokenizer,
          seq_len=self.config.seq_len, batch_size=batch_size,
          num_examples=num_examples or None)
      self._eval[key] = batches
    return self._eval[key]
