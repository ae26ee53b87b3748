r"""Exact match read off the loss pass's argmaxes against greedy decoding.

  python docs/research/exact_match_check.py \
      --config=experiments/kv_arithmetic.py --workdir=W

Reruns `calm_jax.main` on a finished workdir (nothing trains again; it
scores every row, and may rewrite W's results files with the same
numbers, so point it at a copy to keep them untouched). For every row and
exact-match split it scores each eval example both ways before the table
does (`evaluation.exact_matches` from `tasks.nll_program`'s hits, and
`decoding.generate` with the completion compared to the target text) and
prints one line per row and split:

  CMP <row> <split> examples N agree A by_logits L by_decoding D \
      seconds by_logits S by_decoding T

A < N would mean the two disagree on some example (argmaxes of logits
equal to rounding, which the cached decode step and the whole forward pass
round differently).
"""

import sys
import time

from absl import app
from jax.experimental import multihost_utils
import numpy as np

from calm_jax import data as data_lib
from calm_jax import evaluation
from calm_jax import main as main_lib
from calm_jax import sharding
from calm_jax import tasks

_EVALUATE = evaluation.evaluate


def _compare(row, split, batches, *, tokenizer, mesh, max_new_tokens):
  """Prints how often the two ways agree on one row and split."""
  n = agree = by_logits = by_decoding = 0
  t_logits = t_decoding = 0.0
  for b in batches:
    batch = sharding.global_batch(data_lib.model_inputs(b), mesh, whole=True)
    t = time.time()
    hits = tasks.nll_program(row.model, row.composed)(row.params, batch)[3]
    fast = evaluation.exact_matches(
        row.model,
        np.asarray(multihost_utils.process_allgather(hits, tiled=True)), b,
        tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    t_logits += time.time() - t
    t = time.time()
    texts = evaluation._decode(row, b, batch, tokenizer=tokenizer, mesh=mesh,  # pylint: disable=protected-access
                               max_new_tokens=max_new_tokens)
    slow = [x == str(r) for x, r, v in zip(texts, b['target_text'],
                                           b['valid']) if v]
    t_decoding += time.time() - t
    if fast is None:
      raise SystemExit(f'{row.name} {split}: targets that do not spell '
                       'their text; exact match decodes there.')
    n += len(slow)
    agree += sum(a == c for a, c in zip(fast, slow))
    by_logits += sum(fast)
    by_decoding += sum(slow)
  print(f'CMP {row.name} {split} examples {n} agree {agree} by_logits '
        f'{by_logits} by_decoding {by_decoding} seconds by_logits '
        f'{t_logits:.2f} by_decoding {t_decoding:.2f}', flush=True)


def _evaluate(rows, splits, **kw):
  """Compares the two ways on every exact-match split, then scores."""
  metrics = kw.get('metrics') or {}
  for row in rows:
    tokenizer = row.tokenizer or kw['tokenizer']
    for split, batches in splits.items():
      # Only where scoring reads the argmaxes; elsewhere it decodes.
      if evaluation.reads_argmaxes(
          metrics.get(split, 'exact_match'), tokenizer,
          aligned=bool(row.aligned), decode=False):
        _compare(row, split, (row.splits or {}).get(split, batches),
                 tokenizer=tokenizer, mesh=kw['mesh'],
                 max_new_tokens=kw['max_new_tokens'])
  return _EVALUATE(rows, splits, **kw)


if __name__ == '__main__':
  evaluation.evaluate = _evaluate
  app.run(main_lib.main, argv=sys.argv)
