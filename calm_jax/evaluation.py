"""Evaluation rows: exact match by greedy decoding, and teacher-forced loss.

A *row* is one model of the results table (each frozen model alone, CALM,
baselines). Every row is scored on every eval split the same way: the prompt
is decoded greedily with the KV-cached decoder and the completion must equal
the target string exactly; the loss is the mean next-token cross-entropy over
the target tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import Any, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from calm_jax import decoding
from calm_jax import paths
from calm_jax import sharding

from calm_jax.data import MODEL_KEYS


@dataclasses.dataclass
class Row:
  name: str
  model: nn.Module
  params: Any
  composed: bool = False  # Composed models also take `prompt_len`.

  def model_kwargs(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return {'prompt_len': batch['prompt_len']} if self.composed else {}


@functools.lru_cache(maxsize=None)
def _loss_fn(model: nn.Module, composed: bool):
  def fn(params, batch):
    kw = {'prompt_len': batch['prompt_len']} if composed else {}
    logits = model.apply({'params': params}, batch['inputs'], **kw)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    return (nll * batch['weights']).sum(), batch['weights'].sum()
  return jax.jit(fn)


def evaluate_row(row: Row, batches: Sequence[dict[str, np.ndarray]], *,
                 tokenizer, mesh, max_new_tokens: int) -> dict[str, float]:
  """Exact-match accuracy and loss of one row on one split's batches."""
  loss_sum = weight = 0.0
  correct = total = 0
  for b in batches:
    # Every process holds the whole eval batch and places its own rows.
    batch = sharding.global_batch({k: b[k] for k in MODEL_KEYS}, mesh,
                                  whole=True)
    nll, w = _loss_fn(row.model, row.composed)(row.params, batch)
    loss_sum, weight = loss_sum + float(nll), weight + float(w)
    # The prompt alone (BOS + prompt), right-padded.
    positions = np.arange(b['inputs'].shape[1])[None]
    prompts = np.where(positions < b['prompt_len'][:, None], b['inputs'],
                       tokenizer.pad_id).astype(np.int32)
    out = decoding.generate(
        row.model, row.params,
        sharding.global_batch({'p': prompts}, mesh, whole=True)['p'],
        batch['prompt_len'], max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        model_kwargs=row.model_kwargs(batch))
    new_tokens = multihost_utils.process_allgather(out['new_tokens'],
                                                   tiled=True)
    texts = decoding.decode_texts(np.asarray(new_tokens), tokenizer)
    for text, target, valid in zip(texts, b['target_text'], b['valid']):
      if valid:
        target = target.decode() if isinstance(target, bytes) else target
        correct += int(text == target)
        total += 1
  return {'accuracy': 100.0 * correct / max(total, 1),
          'loss': loss_sum / max(weight, 1.0), 'examples': total}


def evaluate(rows: Sequence[Row], splits: dict[str, list[dict[str, Any]]], *,
             tokenizer, mesh, max_new_tokens: int) -> dict[str, Any]:
  """Scores every row on every split: {'rows': {row: {split: metrics}}}."""
  results = {'rows': {}, 'splits': list(splits)}
  for row in rows:
    results['rows'][row.name] = {
        split: evaluate_row(row, batches, tokenizer=tokenizer, mesh=mesh,
                            max_new_tokens=max_new_tokens)
        for split, batches in splits.items()}
  return results


def aggregate(per_seed: dict[str, list[dict[str, dict[str, float]]]],
              splits: Sequence[str]) -> dict[str, Any]:
  """Mean and (population) std over seeds of each row's metrics."""
  rows = {}
  for name, runs in per_seed.items():
    rows[name] = {}
    for split in splits:
      acc = np.array([r[split]['accuracy'] for r in runs])
      loss = np.array([r[split]['loss'] for r in runs])
      rows[name][split] = {
          'accuracy': float(acc.mean()), 'accuracy_std': float(acc.std()),
          'loss': float(loss.mean()), 'loss_std': float(loss.std()),
          'examples': runs[0][split]['examples'],
          'seeds': len(runs), 'accuracy_per_seed': acc.tolist()}
  return {'rows': rows, 'splits': list(splits)}


def format_table(results: dict[str, Any]) -> str:
  """A markdown table: exact match % (mean ± std over seeds), and loss."""
  splits = results['splits']
  lines = ['| row | seeds | ' + ' | '.join(
      f'{s} acc % | {s} loss' for s in splits) + ' |',
           '|---|---|' + '---|---|' * len(splits)]
  for name, per_split in results['rows'].items():
    cells = []
    for s in splits:
      m = per_split[s]
      cells.append(f"{m['accuracy']:.1f} ± {m.get('accuracy_std', 0):.1f}")
      cells.append(f"{m['loss']:.3f}")
    seeds = per_split[splits[0]].get('seeds', 1)
    lines.append(f'| {name} | {seeds} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  lines.append('Exact match by greedy decoding (mean ± std over seeds); loss '
               'is the mean target-token cross-entropy.')
  return '\n'.join(lines)


def write_results(results: dict[str, Any], workdir: str) -> str:
  """Writes results.json, results.md and results.png; returns the json path."""
  path = os.path.join(workdir, 'results.json')
  paths.atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
  paths.atomic_write_text(os.path.join(workdir, 'results.md'),
                format_table(results) + '\n')
  try:
    plot(results, os.path.join(workdir, 'results.png'))
  except ImportError as e:  # matplotlib is optional.
    logging.warning('No results.png: %s', e)
  return path


def plot(results: dict[str, Any], path: str) -> None:
  """Grouped bars: accuracy per split for every row, std as error bars."""
  # The object API draws off-screen without touching pyplot's backend, so
  # a notebook that called train_and_evaluate keeps showing its plots.
  from matplotlib.figure import Figure
  names, splits = list(results['rows']), results['splits']
  width = 0.8 / len(splits)
  fig = Figure(figsize=(max(6, 1.1 * len(names)), 4))
  ax = fig.subplots()
  for i, split in enumerate(splits):
    acc = [results['rows'][n][split]['accuracy'] for n in names]
    std = [results['rows'][n][split].get('accuracy_std', 0) for n in names]
    ax.bar(np.arange(len(names)) + i * width, acc, width, yerr=std,
           label=split, capsize=2)
  ax.set_xticks(np.arange(len(names)) + width * (len(splits) - 1) / 2)
  ax.set_xticklabels(names, rotation=30, ha='right')
  ax.set_ylabel('exact match %')
  ax.set_ylim(0, 100)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  tmp = epath.Path(path + '.tmp')
  tmp.write_bytes(buf.getvalue())
  tmp.replace(epath.Path(path))
