r"""Runs one experiment's table as parallel processes on one machine.

A results table is many independent trainings, one per trained row and
seed, and a small CPU run of `calm_jax.main` keeps about one core busy. This
launcher spreads them over `--workers` processes, each pinned to its own
share of the cores (by `taskset`, when installed), in three phases over one
workdir:

  1. prepare: one process builds the data and pretrains the frozen models
     (it runs the config's frozen rows, m_A and m_B);
  2. train: `--workers` processes take (row, seed) runs from a queue. A row
     that pretrains a frozen model of its own (calm_vanilla_aug) keeps all
     its seeds in one run, so that model is made once;
  3. score: one process runs the whole config again. Every run resumes at
     its last step, so nothing trains: it scores each row and writes
     results.json, results.md and results.png.

  python launch/local.py --workers=2 \
    --config=experiments/kv_arithmetic.py:single_token --workdir=/tmp/kv \
    [--config.train.steps=100 ...] [--dry_run]

`--config` and its overrides are exactly those of `calm_jax.main` (the
rows and seeds of each run are the launcher's). Each run logs to
WORKDIR/logs/prepare.log, train_<row>[_seed<N>].log and score.log; the launcher prints one line per
finished run and the wall time of each phase. Rerunning resumes like
`calm_jax.main` does. Runs share the persistent XLA compilation cache in
WORKDIR/xla_cache (unless JAX_COMPILATION_CACHE_DIR is set), so later seeds
of a row skip compilation. Each run imports the checkout as it starts: if
the code changes while the table runs, the launcher says so at the end
and records each run's revision and uncommitted diff in WORKDIR/run.json
(`code_versions`), which results/make.py reports. On one host only:
multi-host runs use `tpu_pod.sh` / `slurm_gpu.sh`, where JAX itself joins
the processes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from calm_jax import locks
from calm_jax import logs
from calm_jax import paths
from calm_jax import provenance
from calm_jax import rows as rows_lib
from calm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally FILE:VARIANT '
    '(as for calm_jax.main).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The experiment workdir.')
_WORKERS = flags.DEFINE_integer(
    'workers', 2, 'Training processes at once (phase 2).', lower_bound=1)
_CORES = flags.DEFINE_integer(
    'cores_per_worker', 0, 'Cores each worker is pinned to; 0: the usable '
    'cores divided evenly among the workers.', lower_bound=0)
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print the commands of every phase instead of running '
    'them.')
_PYTHON = flags.DEFINE_string('python', sys.executable,
                              'Interpreter for the runs.')
flags.mark_flags_as_required(['config', 'workdir'])


@dataclasses.dataclass(frozen=True)
class Run:
  """One `calm_jax.main` process."""
  phase: str
  rows: tuple[str, ...]
  seeds: tuple[int, ...]

  @property
  def name(self) -> str:
    if self.phase != 'train':
      return self.phase
    seeds = f'_seed{self.seeds[0]}' if len(self.seeds) == 1 else ''
    return f'train_{self.rows[0]}{seeds}'


def forwarded_config_args(argv: list[str]) -> list[str]:
  """`--config` and its overrides from argv, minus rows and seeds (the
  launcher sets those per run)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith('--config'):
      continue
    name = arg.split('=', 1)[0]
    words = [arg]
    # `--config.x VALUE` (no '='): the value is the next word.
    if '=' not in arg and i < len(argv) and not argv[i].startswith('--'):
      words.append(argv[i])
      i += 1
    if name not in ('--config.rows', '--config.seeds'):
      out += words
  return out


def plan(rows: tuple[str, ...], seeds: tuple[int, ...]) -> list[Run]:
  """The runs of all three phases, in order.

  Rows that only score a frozen model run once, in phase 1. A row whose
  builder pretrains a frozen model of its own keeps all its seeds in one
  run, so no two processes make that model.
  """
  frozen = tuple(r for r in rows if rows_lib.ROWS[r].frozen) or ('m_B',)
  trained = [r for r in rows if not rows_lib.ROWS[r].frozen]
  own_models = [r for r in rows if rows_lib.ROWS[r].own_models]
  runs = [Run('prepare', frozen, seeds[:1])]
  # Whole-row runs first: they are the longest.
  runs += [Run('train', (r,), seeds) for r in trained if r in own_models]
  runs += [Run('train', (r,), (s,)) for r in trained for s in seeds
           if r not in own_models]
  runs.append(Run('score', rows, seeds))
  return runs


def command(run: Run, python: str, workdir: str,
            config_args: list[str]) -> list[str]:
  fmt = lambda xs: '(' + ','.join(
      f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + (
          ',)' if len(xs) == 1 else ')')
  return [python, '-m', 'calm_jax.main', *config_args,
          f'--workdir={workdir}', f'--config.rows={fmt(run.rows)}',
          f'--config.seeds={fmt(run.seeds)}']


def core_sets(workers: int, per_worker: int) -> list[list[int]]:
  """Disjoint core lists, one per worker (shared when there are too few)."""
  cores = sorted(os.sched_getaffinity(0))
  per_worker = per_worker or max(1, len(cores) // workers)
  return [[cores[(w * per_worker + c) % len(cores)]
           for c in range(per_worker)] for w in range(workers)]


def _execute(run: Run, cmd: list[str], workdir: str, env: dict[str, str],
             cores: list[int] | None) -> tuple[int, float, str]:
  log = os.path.join(workdir, 'logs', f'{run.name}.log')
  # The run works under this launcher's workdir lock.
  env = dict(env, **{locks.LAUNCHER_ENV: run.name})
  if cores and shutil.which('taskset'):
    cmd = ['taskset', '-c', ','.join(map(str, cores)), *cmd]
  start = time.monotonic()
  with open(log, 'w') as f:
    f.write('+ ' + shlex.join(cmd) + '\n')
    f.flush()
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                        check=False).returncode
  return rc, time.monotonic() - start, log


def _report(run: Run, rc: int, seconds: float, log: str) -> None:
  status = 'done' if rc == 0 else f'FAILED (exit {rc})'
  print(f'[{run.name}] {status} in {seconds / 60:.1f} min; log {log}',
        flush=True)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  config = logs.config_value(_CONFIG)
  # What every run would refuse, refused once, before any of them starts.
  logs.run_reporting_errors(train.validate, config)
  rows, seeds = tuple(config.rows), tuple(config.seeds)
  workdir = os.path.abspath(_WORKDIR.value)
  config_args = forwarded_config_args(sys.argv[1:])
  runs = plan(rows, seeds)
  commands = {run: command(run, _PYTHON.value, workdir, config_args)
              for run in runs}
  if _DRY_RUN.value:
    for run in runs:
      print(f'# {run.name}\n{shlex.join(commands[run])}')
    return 0

  os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
  # One launcher (or calm_jax.main) per workdir; its runs work under this
  # lock, which the process's exit releases, however it exits.
  lock = contextlib.ExitStack()
  logs.run_reporting_errors(lock.enter_context, locks.hold(
      os.path.join(workdir, locks.WORKDIR_LOCK), f'--workdir={workdir}'))
  paths.atomic_write_text(os.path.join(workdir, 'config.json'),
                          config.to_json_best_effort(indent=2))
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR',
                 os.path.join(workdir, 'xla_cache'))
  start = time.monotonic()

  def serial(run: Run) -> None:
    rc, seconds, log = _execute(run, commands[run], workdir, env, None)
    _report(run, rc, seconds, log)
    if rc:
      sys.exit(f'local.py: phase {run.phase!r} failed; see {log}')
    print(f'phase {run.phase}: {seconds / 60:.1f} min', flush=True)

  serial(runs[0])
  train_runs = runs[1:-1]
  t = time.monotonic()
  free = queue.Queue()
  for cores in core_sets(_WORKERS.value, _CORES.value):
    free.put(cores)

  done: list[float] = []
  progress = threading.Lock()

  def work(run: Run) -> int:
    cores = free.get()
    try:
      rc, seconds, log = _execute(run, commands[run], workdir, env, cores)
    finally:
      free.put(cores)
    _report(run, rc, seconds, log)
    with progress:
      # The whole table's progress: runs done, and what is left at the
      # pace so far (runs in flight share the workers).
      done.append(seconds)
      left = len(train_runs) - len(done)
      eta = sum(done) / len(done) * left / _WORKERS.value
      print(f'[table] {len(done)}/{len(train_runs)} runs trained | elapsed '
            f'{(time.monotonic() - start) / 60:.1f} min | eta '
            f'{eta / 60:.1f} min', flush=True)
    return rc

  with concurrent.futures.ThreadPoolExecutor(_WORKERS.value) as pool:
    failed = [run.name for run, rc in zip(train_runs,
                                          pool.map(work, train_runs)) if rc]
  if failed:
    sys.exit(f'local.py: {len(failed)} run(s) failed: {", ".join(failed)}; '
             f'logs in {os.path.join(workdir, "logs")}. Rerun to resume.')
  print(f'phase train: {(time.monotonic() - t) / 60:.1f} min with '
        f'{_WORKERS.value} workers', flush=True)
  serial(runs[-1])
  total = (time.monotonic() - start) / 60
  print(f'total: {total:.1f} min', flush=True)
  # The table's provenance is this command, not its last phase's.
  info = provenance.run_info()
  info.update(command=shlex.join([os.path.basename(sys.executable)]
                                 + sys.argv), total_min=round(total, 1),
              workers=_WORKERS.value)
  versions = provenance.code_versions(os.path.join(workdir, 'logs'),
                                       [run.name for run in runs])
  if len(set(versions.values())) > 1:
    info['code_versions'] = versions
    print('local.py: the code changed while this table ran (a run imports '
          'the checkout as it starts): ' + '; '.join(
              f'{v or "unknown"}: {", ".join(n for n in versions if versions[n] == v)}'
              for v in dict.fromkeys(versions.values())), flush=True)
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump(info, f, indent=2)
  with open(os.path.join(workdir, 'results.md')) as f:
    print(f.read(), flush=True)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=logs.parse_flags)
