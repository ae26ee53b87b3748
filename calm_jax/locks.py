"""One writer per directory: advisory locks that a kill -9 releases.

Two `calm_jax.main` processes on one workdir would otherwise race: both
generate the same TFDS data (one crashes renaming it), both pretrain and save
the same model, one resumes the other's half-written run. Each thing a run
writes is guarded by an `fcntl` lock held while it is written:

  WORKDIR/.lock                     a whole `calm_jax.main` run
  WORKDIR/tfds/<builder>.lock       generating a dataset
  WORKDIR/models/<role>.lock        pretraining a frozen model
  WORKDIR/runs/<row>/seed_<s>/.lock training one row's seed
  WORKDIR/results.lock              merging results.* (held for moments)

A second process that reaches a held lock is refused at once, naming the
holder's pid and command. Rows of one table still train in parallel
(`launch/local.py`): the launcher holds the workdir's lock and tells its
runs so (`LAUNCHER_ENV`); no two of them share a run directory. The kernel
drops a lock when its process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
import time
from typing import Iterator


WORKDIR_LOCK = '.lock'
# Set by launch/local.py for the runs it starts, to the run's name: the
# launcher holds the workdir's lock for them.
LAUNCHER_ENV = 'CALM_JAX_LAUNCHED_RUN'


class LockedError(ValueError):
  """What another process holds."""


def launcher_run() -> str | None:
  """The name launch/local.py gave this process's run, or None."""
  name = os.environ.get(LAUNCHER_ENV, '').strip()
  if not name:
    return None
  if not all(c.isalnum() or c in '._-' for c in name):
    raise ValueError(f'{LAUNCHER_ENV}={name!r} is not a run name; unset it '
                     '(launch/local.py sets it for the runs it starts).')
  return name


@contextlib.contextmanager
def hold(path: str, what: str, wait_s: float = 0.0, enabled: bool = True
         ) -> Iterator[None]:
  """Holds the advisory lock `path` (created if needed) for `what`.

  Refused at once (after `wait_s` at most) if another process holds it,
  with that process's pid and command. Not `enabled` (the other processes
  of a multi-host run, which share the writer's directories) or a path on
  object storage ('gs://...', where fcntl has no meaning): no lock.
  """
  if not enabled or '://' in os.fspath(path):
    yield
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    deadline = time.monotonic() + wait_s
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip()
          raise LockedError(
              f'{what} is in use by another process ({holder or "unknown"}, '
              f'lock {path}); wait for it to finish or stop it, or use '
              'another --workdir.') from None
        time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()}: {shlex.join(sys.argv)}'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
