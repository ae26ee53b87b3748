"""Evaluation rows: a decoded-output metric and the teacher-forced loss.

A *row* is one model of the results table (each frozen model alone, CALM,
baselines). Every row is scored on every eval split the same way: the loss is
the mean next-token cross-entropy over the target tokens, and, unless the
split's metric is 'loss', the prompt is decoded greedily with the KV-cached
decoder and the completion is scored by the split's metric
(`config.eval.metrics[split]`, 'exact_match' by default):

  exact_match  % of completions equal to the target string    -> 'accuracy'
  chrf         corpus chrF (sacrebleu); with a `lang` field, the unweighted
               mean over languages, each also reported as 'chrf/<lang>'
  pass_rate    % of generated function bodies whose doctests pass in a
               sandboxed subprocess (examples with a `tests` field only)
  loss         no decoding
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

# Metric name -> the key of its headline number in a split's results.
METRICS = {'exact_match': 'accuracy', 'chrf': 'chrf', 'pass_rate': 'pass_rate',
           'loss': 'loss'}
# Headline numbers that are percentages (0-100, higher is better).
_PERCENT = ('accuracy', 'chrf', 'pass_rate')


def check_metric(metric: str, field: str) -> None:
  if metric not in METRICS:
    raise ValueError(f'{field}={metric!r} is not a metric; choose one of '
                     f'{sorted(METRICS)}.')


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


def _score(metric: str, texts: list[str], fields: dict[str, list[str]],
           sandbox: dict[str, Any] | None) -> dict[str, float]:
  """The metric's numbers over the decoded `texts` of valid examples."""
  targets = fields['target_text']
  if metric == 'exact_match':
    correct = sum(t == r for t, r in zip(texts, targets))
    return {'accuracy': 100.0 * correct / max(len(texts), 1)}
  if metric == 'chrf':
    from calm_jax import metrics  # Deferred: sacrebleu is only needed here.
    if 'lang_text' not in fields:
      return {'chrf': metrics.chrf(texts, targets)}
    per_lang = metrics.grouped(metrics.chrf, texts, targets,
                               fields['lang_text'])
    out = {'chrf': per_lang.pop('mean')}
    out.update({f'chrf/{lang}': v for lang, v in sorted(per_lang.items())})
    return out
  if metric == 'pass_rate':
    from calm_jax import sandbox as sandbox_lib
    programs = [
        sandbox_lib.doctest_program(module, name, prompt + text, tests)
        for text, prompt, tests, module, name in zip(
            texts, fields['prompt_text'], fields['tests_text'],
            fields['module_text'], fields['name_text'])
        if tests and module]
    passed = sandbox_lib.pass_rate(programs, **(sandbox or {}))
    return {'pass_rate': 100.0 * sum(passed) / max(len(passed), 1),
            'pass_rate_examples': float(len(passed))}
  raise ValueError(f'Unknown metric {metric!r}; choose one of '
                   f'{sorted(METRICS)}.')


def evaluate_row(row: Row, batches: Sequence[dict[str, np.ndarray]], *,
                 tokenizer, mesh, max_new_tokens: int,
                 metric: str = 'exact_match',
                 sandbox: dict[str, Any] | None = None) -> dict[str, float]:
  """The metric, the loss and the example count of one row on one split."""
  check_metric(metric, 'metric')
  loss_sum = weight = 0.0
  texts: list[str] = []
  fields: dict[str, list[str]] = {}
  for b in batches:
    # Every process holds the whole eval batch and places its own rows.
    batch = sharding.global_batch({k: b[k] for k in MODEL_KEYS}, mesh,
                                  whole=True)
    nll, w = _loss_fn(row.model, row.composed)(row.params, batch)
    loss_sum, weight = loss_sum + float(nll), weight + float(w)
    valid = np.asarray(b['valid'])
    for name in b:
      if name.endswith('_text'):
        fields.setdefault(name, []).extend(
            v.decode() if isinstance(v, bytes) else str(v)
            for v in np.asarray(b[name])[valid])
    if metric == 'loss':
      continue
    # The prompt alone (BOS + prompt), right-padded.
    positions = np.arange(b['inputs'].shape[1])[None]
    prompts = np.where(positions < b['prompt_len'][:, None], b['inputs'],
                       tokenizer.pad_id).astype(np.int32)
    # Completions stop where the KV cache ends (the model's max_len): a
    # target never reaches past it, since examples fit data.seq_len.
    budget = min(max_new_tokens, decoding.max_len_of(row.model) -
                 int(np.max(b['prompt_len'])))
    out = decoding.generate(
        row.model, row.params,
        sharding.global_batch({'p': prompts}, mesh, whole=True)['p'],
        batch['prompt_len'], max_new_tokens=budget,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        model_kwargs=row.model_kwargs(batch))
    new_tokens = multihost_utils.process_allgather(out['new_tokens'],
                                                   tiled=True)
    decoded = decoding.decode_texts(np.asarray(new_tokens), tokenizer)
    texts.extend(t for t, v in zip(decoded, valid) if v)
  result = {'loss': loss_sum / max(weight, 1.0),
            'examples': len(fields.get('target_text', ()))}
  if metric != 'loss':
    result.update(_score(metric, texts, fields, sandbox))
  return result


def evaluate(rows: Sequence[Row], splits: dict[str, list[dict[str, Any]]], *,
             tokenizer, mesh, max_new_tokens: int,
             metrics: dict[str, str] | None = None,
             sandbox: dict[str, Any] | None = None) -> dict[str, Any]:
  """Scores every row on every split: {'rows': {row: {split: metrics}}}.

  `metrics` maps a split to its metric (default 'exact_match').
  """
  metrics = metrics or {}
  results = {'rows': {}, 'splits': list(splits)}
  for row in rows:
    results['rows'][row.name] = {
        split: evaluate_row(row, batches, tokenizer=tokenizer, mesh=mesh,
                            max_new_tokens=max_new_tokens,
                            metric=metrics.get(split, 'exact_match'),
                            sandbox=sandbox)
        for split, batches in splits.items()}
  return results


def headline(split_metrics: dict[str, Any], metric: str) -> str:
  """'12.3 ± 0.4' of the metric's headline number (mean ± std over seeds)."""
  key = METRICS[metric]
  fmt = '.3f' if key == 'loss' else '.1f'
  return (f"{split_metrics[key]:{fmt}} ± "
          f"{split_metrics.get(key + '_std', 0.0):{fmt}}")


def aggregate(per_seed: dict[str, list[dict[str, dict[str, float]]]],
              splits: Sequence[str],
              metrics: dict[str, str] | None = None) -> dict[str, Any]:
  """Mean, (population) std and per-seed values of every number, per split.

  The result also records each split's metric (`metrics`, default
  'exact_match'), which `format_table` and `plot` report.
  """
  metrics = {s: (metrics or {}).get(s, 'exact_match') for s in splits}
  rows = {}
  for name, runs in per_seed.items():
    rows[name] = {}
    for split in splits:
      out = {'examples': runs[0][split]['examples'], 'seeds': len(runs)}
      for key in runs[0][split]:
        if key == 'examples':
          continue
        values = np.array([r[split][key] for r in runs], np.float64)
        out[key] = float(values.mean())
        out[f'{key}_std'] = float(values.std())
        out[f'{key}_per_seed'] = values.tolist()
      rows[name][split] = out
  return {'rows': rows, 'splits': list(splits), 'metrics': metrics}


_LABELS = {'accuracy': 'exact match %', 'chrf': 'chrF', 'pass_rate':
           'pass rate %', 'loss': 'loss'}


def format_table(results: dict[str, Any]) -> str:
  """A markdown table: each split's metric (mean ± std over seeds) and loss."""
  splits = results['splits']
  metrics = results.get('metrics') or {s: 'exact_match' for s in splits}
  head = []
  for s in splits:
    key = METRICS[metrics[s]]
    head += [f'{s} {_LABELS[key]}'] + ([f'{s} loss'] if key != 'loss' else [])
  lines = ['| row | seeds | ' + ' | '.join(head) + ' |',
           '|---|---|' + '---|' * len(head)]
  for name, per_split in results['rows'].items():
    cells = []
    for s in splits:
      m = per_split[s]
      cells.append(headline(m, metrics[s]))
      if METRICS[metrics[s]] != 'loss':
        cells.append(f"{m['loss']:.3f}")
    seeds = per_split[splits[0]].get('seeds', 1)
    lines.append(f'| {name} | {seeds} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  used = sorted({metrics[s] for s in splits})
  notes = {'exact_match': 'exact match by greedy decoding',
           'chrf': 'chrF of greedy decodes (mean over languages where the '
                   'split has several)',
           'pass_rate': 'doctest pass rate of greedily decoded function '
                        'bodies, run in a sandbox',
           'loss': 'teacher-forced loss only'}
  note = '; '.join(notes[m] for m in used)
  lines.append(note[0].upper() + note[1:] + ' (mean ± std over seeds). Loss '
               'is the mean target-token cross-entropy.')
  # Per-group breakdowns (e.g. chrF per language), one table per split.
  for s in splits:
    key = METRICS[metrics[s]]
    groups = sorted({k.split('/', 1)[1] for m in results['rows'].values()
                     for k in m[s] if k.startswith(key + '/') and
                     not k.endswith(('_std', '_per_seed'))})
    if not groups:
      continue
    lines += ['', f'{s}: {_LABELS[key]} per group', '',
              '| row | ' + ' | '.join(groups) + ' |',
              '|---|' + '---|' * len(groups)]
    for name, per_split in results['rows'].items():
      lines.append(f'| {name} | ' + ' | '.join(
          f"{per_split[s].get(f'{key}/{g}', float('nan')):.1f}"
          for g in groups) + ' |')
  return '\n'.join(lines)


def write_results(results: dict[str, Any], workdir: str) -> str:
  """Writes results.json, results.md and results.png; returns the json path."""
  path = os.path.join(workdir, 'results.json')
  paths.atomic_write_text(path, json.dumps(results, indent=2))
  paths.atomic_write_text(os.path.join(workdir, 'results.md'),
                format_table(results) + '\n')
  try:
    plot(results, os.path.join(workdir, 'results.png'))
  except ImportError as e:  # matplotlib is optional.
    logging.warning('No results.png: %s', e)
  return path


def plot(results: dict[str, Any], path: str) -> None:
  """Grouped bars of each split's headline number per row, std as error bars.

  Percentage metrics share one axis (0-100); splits scored by loss only are
  drawn only when no split has a percentage metric.
  """
  # The object API draws off-screen without touching pyplot's backend, so
  # a notebook that called train_and_evaluate keeps showing its plots.
  from matplotlib.figure import Figure
  names, splits = list(results['rows']), results['splits']
  metrics = results.get('metrics') or {s: 'exact_match' for s in splits}
  shown = [s for s in splits if METRICS[metrics[s]] in _PERCENT] or splits
  width = 0.8 / len(shown)
  fig = Figure(figsize=(max(6, 1.1 * len(names)), 4))
  ax = fig.subplots()
  for i, split in enumerate(shown):
    key = METRICS[metrics[split]]
    value = [results['rows'][n][split][key] for n in names]
    std = [results['rows'][n][split].get(key + '_std', 0) for n in names]
    ax.bar(np.arange(len(names)) + i * width, value, width, yerr=std,
           label=f'{split} ({_LABELS[key]})', capsize=2)
  ax.set_xticks(np.arange(len(names)) + width * (len(shown) - 1) / 2)
  ax.set_xticklabels(names, rotation=30, ha='right')
  keys = {METRICS[metrics[s]] for s in shown}
  ax.set_ylabel(_LABELS[keys.pop()] if len(keys) == 1 else 'score')
  if all(METRICS[metrics[s]] in _PERCENT for s in shown):
    ax.set_ylim(0, 100)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  tmp = epath.Path(path + '.tmp')
  tmp.write_bytes(buf.getvalue())
  tmp.replace(epath.Path(path))
