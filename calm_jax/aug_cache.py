"""Augmenting-model hidden states for a training split, computed once.

m_A is frozen, so its states at the paired layers for a fixed dataset never
change; a composition that trains for several epochs can read them from disk
instead of running m_A every step. `build` runs m_A once over the split (in
index order) and writes one float array per (model, layer) with a
`meta.json`, through a temporary directory renamed into place; `CachedSource`
serves the split's examples with their states attached under
`cached/<name>/<layer>` keys, which the input pipeline passes through and
`states_from_batch` turns back into the composition's `aug_states`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.data import pipeline
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

META = 'meta.json'


def _key(name: str, layer: int) -> str:
  return f'{pipeline.CACHED}{name}/{layer}'


def build(directory: str, augmenting: Sequence[composition_lib.Augmenting],
          frozen: dict[str, Any], source: Sequence[Any], *, tokenizer,
          seq_len: int, batch_size: int = 64) -> None:
  """Writes the paired-layer states of every augmenting model, if missing."""
  directory = epath.Path(directory)
  if (directory / META).exists():
    return
  tmp = directory.parent / (directory.name + '.partial')
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  n = len(source)
  logging.info('Caching augmenting states of %d examples in %s', n, directory)
  for a in augmenting:
    layers = a.layers
    model = transformer.Decoder(a.config)
    fn = jax.jit(lambda p, x: model.apply({'params': p}, x,
                                          method='hidden_states',
                                          layers=tuple(layers)))
    out = {i: np.lib.format.open_memmap(
        os.fspath(tmp / f'{a.name}_{i}.npy'), mode='w+', dtype=np.float32,
        shape=(n, seq_len, a.config.d_model)) for i in layers}
    for start in range(0, n, batch_size):
      idx = range(start, min(n, start + batch_size))
      tokens = np.stack([
          pipeline.encode_example(example, tokenizer, seq_len)['inputs']
          for _, example in pipeline.read_examples(source, idx)])
      states = jax.device_get(fn(frozen[f'aug_{a.name}'], jnp.asarray(tokens)))
      for i in layers:
        out[i][start:start + len(idx)] = states[i]
    for arr in out.values():
      arr.flush()
  (tmp / META).write_text(json.dumps({
      'examples': n, 'seq_len': seq_len,
      'arrays': {a.name: a.layers for a in augmenting}}))
  tmp.rename(directory)


class CachedSource:
  """`source` with each example's cached states attached (random access)."""

  def __init__(self, source: Sequence[Any], directory: str):
    directory = epath.Path(directory)
    meta = json.loads((directory / META).read_text())
    if meta['examples'] != len(source):
      raise ValueError(
          f'The augmenting-state cache {directory} holds {meta["examples"]} '
          f'examples but the split has {len(source)}; delete the cache.')
    self._source = source
    self._arrays = {
        _key(name, i): np.load(os.fspath(directory / f'{name}_{i}.npy'),
                               mmap_mode='r')
        for name, layers in meta['arrays'].items() for i in layers}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self._source[index])
    example.update({k: np.asarray(v[index]) for k, v in self._arrays.items()})
    return example


def states_from_batch(batch: dict[str, Any]
                      ) -> dict[str, dict[int, jax.Array]] | None:
  """The composition's `aug_states` from a batch's cached keys, or None."""
  states: dict[str, dict[int, Any]] = {}
  for key, value in batch.items():
    if key.startswith(pipeline.CACHED):
      name, layer = key[len(pipeline.CACHED):].rsplit('/', 1)
      states.setdefault(name, {})[int(layer)] = value
  return states or None
