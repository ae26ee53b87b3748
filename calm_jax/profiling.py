r"""Where a traced step's time goes, read from jax.profiler's own trace.

A training run traces `train.profile_steps` steps into RUN_DIR/profile
(after `PROFILE_AFTER` warm-up steps, with the compiled step's HLO beside
the trace); benchmarks/train_step.py --profile_dir traces its own steps.
Either directory summarises with

  python -m calm_jax.profiling --trace_dir=W/runs/calm/seed_0/profile

which prints `op_profile`'s JSON: ms per step by op kind and the top ops,
each with the jax op it came from. TensorBoard's profile plugin and
Perfetto (ui.perfetto.dev) read the same files.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# Steps a run takes before its trace starts: compilation, the first
# batches and the allocator's first growth stay out of it.
PROFILE_AFTER = 10
# The compiled step's optimized HLO, written beside a run's trace: op names
# in the trace are its fusions.
HLO_FILE = 'train_step.hlo.txt'


def op_profile(trace_dir: str, steps: int, hlo: str = '', top: int = 8
               ) -> dict[str, object]:
  """Where a traced step's time goes, from jax.profiler's perfetto trace.

  XLA's CPU runtime records one event per executed op (thunk) on the thread
  that ran it. Returns ms per step: `wall` (the executions), `busy` (summed
  over threads), `threads` (busy ms of each thread that ran ops), `kinds`
  (ops by kind: `ynn_fusion` are YNNPACK dots, `*_fusion` XLA's loops) and
  the `top` single ops, each with the jax op it came from (`hlo`: the
  compiled HLO text; by default HLO_FILE in `trace_dir`, if there). With
  the HLO, spans that are none of its ops are listed apart as
  `host_spans_ms` (under the tracer, Python runs several times slower).
  """
  files = sorted(glob.glob(os.path.join(trace_dir, '**',
                                        '*perfetto_trace.json.gz'),
                           recursive=True))
  if not files:
    return {'error': f'no perfetto trace under {trace_dir}'}
  if not hlo and os.path.exists(os.path.join(trace_dir, HLO_FILE)):
    with open(os.path.join(trace_dir, HLO_FILE)) as f:
      hlo = f.read()
  events = json.load(gzip.open(files[-1]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  spans = [e for e in events if e.get('ph') == 'X']
  wall = sum(e['dur'] for e in spans
             if e['name'] == 'ThunkExecutor::Execute (wait for completion)')
  ops = [e for e in spans if not e['name'].startswith('$') and not any(
      w in e['name'] for w in ('Thunk', 'Slinky', 'Pjit', 'Execute',
                               'Threadpool', 'end: '))]
  # With the HLO, only its ops count as the step's; the other spans are
  # the host's (the data iterator, dispatch), which the tracer's Python
  # hooks slow down several times over.
  defined = (set(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = ', hlo, re.M))
             if hlo else None)
  host = collections.Counter()
  per_op, kinds, threads = (collections.Counter() for _ in range(3))
  for e in ops:
    if defined is not None and e['name'] not in defined:
      host[e['name']] += e['dur']
      continue
    per_op[e['name']] += e['dur']
    kinds[re.sub(r'\.\d+$', '', e['name'])] += e['dur']
    threads[e.get('tid')] += e['dur']
  ms = lambda us: round(us / steps / 1e3, 2)

  def origin(name):
    m = re.search('%' + re.escape(name) + r' = .*?op_name="([^"]*)"', hlo)
    return m.group(1)[-90:] if m else ''

  return {
      'wall_ms': ms(wall), 'busy_ms': ms(sum(threads.values())),
      'threads_ms': sorted((ms(v) for v in threads.values() if ms(v) > 0.1),
                           reverse=True),
      'kinds_ms': {k: ms(v) for k, v in kinds.most_common(top)},
      'top_ops_ms': [[k, ms(v), origin(k)] for k, v in per_op.most_common(top)],
      **({'host_spans_ms': {k: ms(v) for k, v in host.most_common(top)}}
         if defined is not None else {}),
  }


def dot_inventory(closed_jaxpr) -> dict[tuple, int]:
  """The matmuls a traced function does: {signature: times it runs}.

  `closed_jaxpr` is `jax.make_jaxpr(f)(*args)`; for a train step that holds
  the forward's dots and the backward's transposed ones. Walks every
  sub-jaxpr (jit, custom_vjp, remat, cond branches); a scan's body counts
  `length` times, and a while loop's body once (its trip count is not in the
  jaxpr). A signature is (lhs shape, rhs shape, lhs dtype, rhs dtype,
  dimension_numbers, preferred_element_type): what `dot_call` rebuilds.
  """
  from jax.extend import core  # pylint: disable=g-import-not-at-top

  counts: collections.Counter[tuple] = collections.Counter()

  def subjaxprs(value):
    if isinstance(value, core.ClosedJaxpr):
      yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
      yield value
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subjaxprs(v)

  def walk(jaxpr, times: int) -> None:
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        lhs, rhs = (v.aval for v in eqn.invars)
        counts[(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype),
                str(rhs.dtype), eqn.params['dimension_numbers'],
                eqn.params.get('preferred_element_type'))] += times
        continue
      inner = times * (eqn.params['length']
                       if eqn.primitive.name == 'scan' else 1)
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          walk(sub, inner)

  walk(closed_jaxpr.jaxpr, 1)
  return dict(counts)


def dot_flops(signature: tuple) -> int:
  """2 x lhs elements x rhs's free size, for one `dot_inventory` key.

  lhs's elements are batch x its free size x the contracted size, so this is
  the usual 2 x output elements x contracted size.
  """
  lhs, rhs, _, _, ((_, rhs_contract), (_, rhs_batch)), _ = signature
  flops = 2
  for size in lhs:
    flops *= size
  for axis, size in enumerate(rhs):
    if axis not in rhs_contract and axis not in rhs_batch:
      flops *= size
  return flops


def dot_call(signature: tuple):
  """(jitted dot, its two random operands) for one `dot_inventory` key."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  lhs, rhs, lhs_dtype, rhs_dtype, dims, preferred = signature
  rng = np.random.default_rng(0)
  operands = [jax.numpy.asarray(rng.standard_normal(shape), dtype)
              for shape, dtype in ((lhs, lhs_dtype), (rhs, rhs_dtype))]
  fn = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, dims, preferred_element_type=preferred))
  return fn, operands


def traced_steps(trace_dir: str) -> int:
  """How many steps a run traced into `trace_dir` (its `steps` file)."""
  path = os.path.join(trace_dir, 'steps')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return int(f.read().split()[0])


def main(argv) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  steps = _STEPS.value or traced_steps(_TRACE_DIR.value)
  if not steps:
    raise app.UsageError(
        f'--trace_dir={_TRACE_DIR.value!r} does not say how many steps it '
        'traced (no `steps` file); give --steps.')
  print(json.dumps(op_profile(_TRACE_DIR.value, steps, top=_TOP.value),
                   indent=1))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _TRACE_DIR = flags.DEFINE_string(
      'trace_dir', None, 'A directory jax.profiler traced into (a run\'s '
      'RUN_DIR/profile, or --profile_dir/MODE of train_step.py).')
  _STEPS = flags.DEFINE_integer('steps', 0, 'Steps the trace holds; 0: '
                                'what the run wrote in trace_dir/steps.')
  _TOP = flags.DEFINE_integer('top', 12, 'Op kinds and single ops listed.')
  flags.mark_flag_as_required('trace_dir')
  app.run(main)
