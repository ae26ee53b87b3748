"""Evaluation rows: a decoded-output metric and the teacher-forced loss.

A *row* is one model of the results table (each frozen model alone, CALM,
baselines). Every row is scored on every eval split the same way: the loss is
the mean next-token cross-entropy over the target tokens, and, unless the
split's metric is 'loss', the prompt is decoded greedily with the KV-cached
decoder and the completion is scored by the split's metric
(`config.eval.metrics[split]`, 'exact_match' by default):

  exact_match  % of completions equal to the target string    -> 'accuracy'
               (with a byte or char tokenizer read off the loss pass's
               argmaxes, without decoding: `greedy_matches`)
  chrf         corpus chrF (sacrebleu); with a `lang` field, the unweighted
               mean over languages, each also reported as 'chrf/<lang>'
  pass_rate    % of generated function bodies whose doctests pass in a
               sandboxed subprocess (examples with a `tests` field only)
  pass_at_k    HumanEval: % of problems whose greedy completion passes its
               tests in the sandbox ('pass@1'); with `eval.sampling.n` > 0
               also the unbiased pass@k of n sampled completions per
               problem ('sampled_pass@k' for each k of `eval.sampling.k`)
  loss         no decoding
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

from calm_jax import decoding
from calm_jax import locks
from calm_jax import paths
from calm_jax import sandbox as sandbox_lib
from calm_jax import sharding
from calm_jax import tasks
from calm_jax.data import humaneval

from calm_jax.data import model_inputs

# Metric name -> the key of its headline number in a split's results.
METRICS = {'exact_match': 'accuracy', 'chrf': 'chrf', 'pass_rate': 'pass_rate',
           'pass_at_k': 'pass@1', 'loss': 'loss'}
# Headline numbers that are percentages (0-100, higher is better).
_PERCENT = ('accuracy', 'chrf', 'pass_rate', 'pass@1')


def check_metric(metric: str, field: str) -> None:
  if metric not in METRICS:
    raise ValueError(f'{field}={metric!r} is not a metric; choose one of '
                     f'{sorted(METRICS)}.')


def validate(eval_cfg: Any, check_split: Callable[[str, str], None],
             check_batch: Callable[[int, str], None]) -> None:
  """`config.eval`: its splits, metrics, sampling and batch size."""
  for i, split in enumerate(eval_cfg.splits):
    check_split(split, f'eval.splits[{i}]')
  if eval_cfg.during_training_split:
    check_split(eval_cfg.during_training_split, 'eval.during_training_split')
  check_batch(eval_cfg.batch_size, 'eval.batch_size')
  for split, metric in (eval_cfg.get('metrics', None) or {}).items():
    if split not in eval_cfg.splits:
      raise ValueError(
          f'eval.metrics.{split}: {split!r} is not one of eval.splits='
          f'{tuple(eval_cfg.splits)}; add it there or remove the entry.')
    check_metric(metric, f'eval.metrics.{split}')
    if metric in ('pass_rate', 'pass_at_k'):
      box = eval_cfg.get('sandbox', None) or {}
      sandbox_lib.check_available(bool(box.get('unsafe', False)),
                                  f'eval.metrics.{split}={metric!r}')
    if metric == 'chrf' and importlib.util.find_spec('sacrebleu') is None:
      raise ValueError(f"eval.metrics.{split}='chrf' needs sacrebleu: pip "
                       "install -e '.[code]' (or '.[ntl]').")
  check_sampling(eval_cfg.get('sampling', None))
  decode = eval_cfg.get('exact_match_decode', False)
  if not isinstance(decode, bool):
    raise ValueError(f'eval.exact_match_decode={decode!r} must be True or '
                     'False.')
  if not isinstance(eval_cfg.max_new_tokens, int) or eval_cfg.max_new_tokens < 1:
    raise ValueError(f'eval.max_new_tokens={eval_cfg.max_new_tokens!r} must '
                     'be a positive int.')


def check_sampling(sampling: Any, field: str = 'eval.sampling') -> None:
  """`eval.sampling`: n samples per problem, the ks, and how to sample."""
  if not sampling:
    return
  n = sampling.get('n', 0)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f'{field}.n={n!r} must be an int >= 0 (0: greedy '
                     'pass@1 only).')
  ks = tuple(sampling.get('k', (1,)))
  if n and (not ks or any(not isinstance(k, int) or not 1 <= k <= n
                          for k in ks)):
    raise ValueError(f'{field}.k={ks!r} must be ints in [1, {field}.n={n}].')
  if n and not sampling.get('temperature', 0.8) > 0:
    raise ValueError(f'{field}.temperature must be > 0 to sample.')


@dataclasses.dataclass
class Row:
  name: str
  model: nn.Module
  params: Any
  composed: bool = False  # Composed models also take `prompt_len`.
  # Aligned compositions: {augmenting model: its tokenizer}; they decode
  # with calm_jax.aligned_decoding from the prompts' text.
  aligned: dict[str, Any] | None = None
  # A model that reads another tokenizer than the anchor (m_A alone): its
  # tokenizer, and its eval batches by split (in its own ids).
  tokenizer: Any = None
  splits: dict[str, Any] | None = None

  def model_kwargs(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
    return {'prompt_len': batch['prompt_len']} if self.composed else {}


def _str(value: Any) -> str:
  """A text column's value (numpy object arrays may hold bytes)."""
  return value.decode() if isinstance(value, bytes) else str(value)


def _decode(row: Row, b: dict[str, np.ndarray], batch: dict[str, jax.Array],
            *, tokenizer, mesh, max_new_tokens: int, rng=None,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
            ) -> list[str]:
  """The completions of one eval batch's prompts (every row, padding too)."""
  if row.aligned:
    from calm_jax import aligned_decoding  # Deferred: aligned rows only.
    prompts = [_str(v) for v in np.asarray(b['prompt_text'])]
    budget = _budget(row.model, b, max_new_tokens)
    return aligned_decoding.generate(
        row.model, row.params, prompts, anchor_tokenizer=tokenizer,
        aug_tokenizers=row.aligned, max_new_tokens=budget, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p)['texts']
  # The prompt alone (BOS + prompt), right-padded.
  positions = np.arange(b['inputs'].shape[1])[None]
  prompts = np.where(positions < b['prompt_len'][:, None], b['inputs'],
                     tokenizer.pad_id).astype(np.int32)
  # Completions stop where the KV cache ends (the model's max_len): a
  # target never reaches past it, since examples fit data.seq_len.
  budget = _budget(row.model, b, max_new_tokens)
  out = decoding.generate(
      row.model, row.params,
      sharding.global_batch({'p': prompts}, mesh, whole=True)['p'],
      batch['prompt_len'], max_new_tokens=budget, rng=rng,
      temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      model_kwargs=row.model_kwargs(batch))
  new_tokens = multihost_utils.process_allgather(out['new_tokens'],
                                                 tiled=True)
  return decoding.decode_texts(np.asarray(new_tokens), tokenizer)


def _budget(model: nn.Module, b: dict[str, np.ndarray],
            max_new_tokens: int) -> int:
  """New tokens a batch's completions may have: `max_new_tokens`, or fewer
  where the KV cache (the model's max_len) ends first."""
  return min(max_new_tokens, decoding.max_len_of(model) -
             int(np.max(b['prompt_len'])))


def reads_argmaxes(metric: str, tokenizer, *, aligned: bool,
                   decode: bool) -> bool:
  """Whether exact match is read off the loss pass's argmaxes
  (`exact_matches`) instead of decoded: a split scored by exact match, a
  tokenizer that spells each text one way, one token stream (not aligned),
  and `eval.exact_match_decode` (`decode`) off."""
  return (metric == 'exact_match' and not decode and not aligned
          and getattr(tokenizer, 'unique_encoding', False))


def exact_matches(model: nn.Module, hits: np.ndarray,
                  b: dict[str, np.ndarray], *, tokenizer,
                  max_new_tokens: int) -> list[bool] | None:
  """`greedy_matches` of `model`'s hits on batch `b` with the decoding
  budget scoring gives it; None where the batch has no targets to match
  (documents) or they do not spell their text."""
  if 'target_text' not in b:
    return None
  return greedy_matches(hits, b, tokenizer,
                        _budget(model, b, max_new_tokens))


def greedy_matches(hits: np.ndarray, b: dict[str, np.ndarray], tokenizer,
                   budget: int) -> list[bool] | None:
  """Exact match of each valid example's greedy completion, read off the
  teacher-forced argmaxes `hits` [b, t] (`tasks.nll_program`).

  With a tokenizer whose texts have one id sequence each, greedy decoding
  returns the target text exactly when it emits the target's ids and then
  EOS, i.e. when each of them is the argmax at the position that predicts
  it, given the ones before (which teacher forcing feeds): the same
  completions as `decoding.generate`, without decoding, up to ties between
  logits equal to rounding (the cached and the whole forward pass round
  differently). Decoding stops after `budget` new tokens, so a target of
  exactly `budget` tokens needs no EOS and a longer one never matches.
  None when an example's targets do not spell its `target_text` + EOS.
  """
  out = []
  for i in np.flatnonzero(b['valid']):
    start = int(b['prompt_len'][i]) - 1  # Predicts the first target token.
    n = int(np.asarray(b['weights'][i]).sum())  # Target tokens and EOS.
    ids = b['targets'][i, start:start + n]
    text = _str(b['target_text'][i])
    if (n < 1 or ids[-1] != tokenizer.eos_id
        or tokenizer.encode(text) != [int(t) for t in ids[:-1]]):
      return None
    length = n - 1
    need = length if length == budget else length + 1
    out.append(length <= budget and bool(hits[i, start:start + need].all()))
  return out


def _equal(texts: Sequence[str], targets: Sequence[str]) -> list[bool]:
  """Exact match of each decoded text to its target."""
  return [t == r for t, r in zip(texts, targets)]


def _score(metric: str, texts: list[str], fields: dict[str, list[str]],
           sandbox: dict[str, Any] | None,
           samples: list[list[str]] | None = None,
           ks: Sequence[int] = ()) -> dict[str, float]:
  """The metric's numbers over the decoded `texts` of valid examples."""
  targets = fields['target_text']
  if metric == 'exact_match':
    correct = sum(_equal(texts, targets))
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
    programs = [
        sandbox_lib.doctest_program(module, name, prompt + text, tests)
        for text, prompt, tests, module, name in zip(
            texts, fields['prompt_text'], fields['tests_text'],
            fields['module_text'], fields['name_text'])
        if tests and module]
    passed = sandbox_lib.pass_rate(programs, **(sandbox or {}))
    return {'pass_rate': 100.0 * sum(passed) / max(len(passed), 1),
            'pass_rate_examples': float(len(passed))}
  if metric == 'pass_at_k':
    problem = (fields['prompt_text'], fields['tests_text'],
               fields['entry_point_text'])
    greedy = humaneval.run(*problem[:1], texts, *problem[1:], sandbox)
    out = {'pass@1': 100.0 * sum(greedy) / max(len(greedy), 1)}
    if samples:
      n = len(samples)
      passed = [humaneval.run(*problem[:1], s, *problem[1:], sandbox)
                for s in samples]
      counts = np.sum(np.array(passed, bool), 0)
      for k in ks:
        out[f'sampled_pass@{k}'] = 100.0 * float(np.mean(
            [humaneval.pass_at_k(n, int(c), k) for c in counts]))
      out['samples'] = float(n)
    return out
  raise ValueError(f'Unknown metric {metric!r}; choose one of '
                   f'{sorted(METRICS)}.')


def evaluate_row(row: Row, batches: Sequence[dict[str, np.ndarray]], *,
                 tokenizer, mesh, max_new_tokens: int,
                 metric: str = 'exact_match',
                 sandbox: dict[str, Any] | None = None,
                 sampling: Any = None, seed: int = 0,
                 exact_match_decode: bool = False) -> dict[str, float]:
  """The metric, the loss and the example count of one row on one split.

  `sampling` ({n, k, temperature, top_k, top_p}) is read by `pass_at_k`:
  n sampled completions per example besides the greedy one. Exact match
  is read off the loss pass's argmaxes (`greedy_matches`) where the
  tokenizer spells each text one way and the row is not aligned, unless
  `exact_match_decode`; otherwise every prompt is decoded.
  """
  check_metric(metric, 'metric')
  check_sampling(sampling)
  n_samples = (sampling or {}).get('n', 0) if metric == 'pass_at_k' else 0
  from_logits = reads_argmaxes(metric, tokenizer, aligned=bool(row.aligned),
                               decode=exact_match_decode)
  loss_sum = weight = 0.0
  texts: list[str] = []
  matches: list[bool] = []
  samples: list[list[str]] = [[] for _ in range(n_samples)]
  fields: dict[str, list[str]] = {}
  for b in batches:
    # Every process holds the whole eval batch and places its own rows.
    batch = sharding.global_batch(model_inputs(b), mesh,
                                  whole=True)
    nll, _, w, hits = tasks.nll_program(row.model, row.composed)(
        row.params, batch)
    loss_sum, weight = loss_sum + float(nll), weight + float(w)
    valid = np.asarray(b['valid'])
    for name in b:
      if name.endswith('_text'):
        fields.setdefault(name, []).extend(
            _str(v) for v in np.asarray(b[name])[valid])
    if metric == 'loss':
      continue
    if from_logits:
      found = exact_matches(
          row.model,
          np.asarray(multihost_utils.process_allgather(hits, tiled=True)), b,
          tokenizer=tokenizer, max_new_tokens=max_new_tokens)
      if found is not None:
        matches.extend(found)
        continue
    kw = dict(tokenizer=tokenizer, mesh=mesh, max_new_tokens=max_new_tokens)
    decoded = [t for t, v in zip(_decode(row, b, batch, **kw), valid) if v]
    if metric == 'exact_match':
      matches.extend(_equal(decoded, [
          _str(v) for v in np.asarray(b['target_text'])[valid]]))
      continue
    texts.extend(decoded)
    for i in range(n_samples):
      rng = jax.random.fold_in(jax.random.key(seed), i)
      rng = jax.random.fold_in(rng, len(texts))  # This batch's own stream.
      decoded = _decode(row, b, batch, rng=rng,
                        temperature=float(sampling.get('temperature', 0.8)),
                        top_k=int(sampling.get('top_k', 0)),
                        top_p=float(sampling.get('top_p', 1.0)), **kw)
      samples[i].extend(t for t, v in zip(decoded, valid) if v)
  result = {'loss': loss_sum / max(weight, 1.0),
            'examples': len(fields.get('target_text', ()))}
  if metric == 'exact_match':
    result['accuracy'] = 100.0 * sum(matches) / max(len(matches), 1)
  elif metric != 'loss':
    result.update(_score(metric, texts, fields, sandbox, samples,
                         tuple((sampling or {}).get('k', (1,)))))
  return result


def evaluate(rows: Sequence[Row], splits: dict[str, list[dict[str, Any]]], *,
             tokenizer, mesh, max_new_tokens: int,
             metrics: dict[str, str] | None = None,
             sandbox: dict[str, Any] | None = None,
             sampling: Any = None, seed: int = 0,
             exact_match_decode: bool = False) -> dict[str, Any]:
  """Scores every row on every split: {'rows': {row: {split: metrics}}}.

  `metrics` maps a split to its metric (default 'exact_match');
  `exact_match_decode` as in `evaluate_row`.
  """
  metrics = metrics or {}
  results = {'rows': {}, 'splits': list(splits)}
  for row in rows:
    own = row.splits or {}
    if row.tokenizer is not None:
      # Its losses are per token of another tokenizer than the table's.
      results.setdefault('own_tokenizer', {})[row.name] = os.path.basename(
          str(row.tokenizer.spec).rstrip('/'))
    results['rows'][row.name] = {
        split: evaluate_row(row, own.get(split, batches),
                            tokenizer=row.tokenizer or tokenizer, mesh=mesh,
                            max_new_tokens=max_new_tokens,
                            metric=metrics.get(split, 'exact_match'),
                            sandbox=sandbox, sampling=sampling, seed=seed,
                            exact_match_decode=exact_match_decode)
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
           'pass rate %', 'pass@1': 'pass@1 %', 'loss': 'loss'}


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
           'pass_at_k': 'HumanEval pass@1 of greedy completions, run with '
                        "the problems' tests in a sandbox",
           'loss': 'teacher-forced loss only'}
  note = '; '.join(notes[m] for m in used)
  lines.append(note[0].upper() + note[1:] + ' (mean ± std over seeds). Loss '
               'is the mean target-token cross-entropy.')
  for name, tok in sorted(results.get('own_tokenizer', {}).items()):
    lines.append(f'{name} reads its own tokenizer ({tok}): its losses are '
                 "per token of that tokenizer, not comparable with the other "
                 "rows' (its chrF and exact match are).")
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
  # A table merged from several invocations says where each row comes from.
  scored = results.get('scored') or {}
  stamps = {(v.get('at'), v.get('config_hash')) for v in scored.values()}
  if scored and len(stamps) > 1:
    lines += ['', 'Rows scored by different invocations:', '']
    lines += [f"- {name}: {v.get('at')}, config {v.get('config_hash')}"
              for name, v in scored.items()]
  return '\n'.join(lines)


def merge_results(old: dict[str, Any] | None, new: dict[str, Any]
                  ) -> tuple[dict[str, Any], bool]:
  """(merged, mergeable): `new`'s rows over `old`'s, row by row.

  Rows that only `old` holds are kept (another invocation scored them),
  with when and under which config each row was scored (`scored`).
  Tables of other splits or metrics do not merge (`mergeable` False).
  """
  if not old or not old.get('rows'):
    return new, True
  if (old.get('splits') != new.get('splits') or
      old.get('metrics') != new.get('metrics')):
    return new, False
  merged = dict(old)
  # This invocation's rows in its order, then the others'.
  merged['rows'] = {**new['rows'], **{k: v for k, v in old['rows'].items()
                                      if k not in new['rows']}}
  for key in ('trainable_params', 'scored'):
    merged[key] = {**old.get(key, {}), **new.get(key, {})}
  merged['frozen_params'] = new.get('frozen_params',
                                    old.get('frozen_params', {}))
  own = {**{k: v for k, v in old.get('own_tokenizer', {}).items()
            if k not in new['rows']}, **new.get('own_tokenizer', {})}
  merged.pop('own_tokenizer', None)
  if own:
    merged['own_tokenizer'] = own
  return merged, True


def write_results(results: dict[str, Any], workdir: str) -> str:
  """Writes results.json, results.md and results.png; returns the json path.

  An existing table's other rows are kept (`merge_results`); one of other
  splits is moved aside to results.<time>.json, never overwritten.
  """
  path = os.path.join(workdir, 'results.json')
  with locks.hold(os.path.join(workdir, 'results.lock'),
                  f'the results of {workdir}', wait_s=60.0):
    old = None
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
    results, mergeable = merge_results(old, results)
    if not mergeable:
      kept = os.path.join(workdir, time.strftime('results.%Y%m%d-%H%M%S.json'))
      os.replace(path, kept)
      logging.info('results.json held a table of other splits or metrics; '
                   'moved to %s', kept)
    _write_table(results, workdir, path)
  return path


def _write_table(results: dict[str, Any], workdir: str, path: str) -> None:
  paths.atomic_write_text(path, json.dumps(results, indent=2))
  paths.atomic_write_text(os.path.join(workdir, 'results.md'),
                format_table(results) + '\n')
  try:
    plot(results, os.path.join(workdir, 'results.png'))
  except ImportError as e:  # matplotlib is optional.
    logging.warning('No results.png: %s', e)


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
