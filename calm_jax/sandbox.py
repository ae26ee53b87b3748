"""Runs untrusted generated Python for the pass-rate metric.

Each program runs in a fresh interpreter (`python -I`: no PYTHON* variables,
no user site, no script directory on sys.path) with a fresh temporary
directory as its working directory, a minimal environment, stdin closed, in a
session (and process group) of its own, under resource limits: address space
(`memory_mb`), CPU seconds, file size and no core files. On timeout the whole
process group is killed. stdout and stderr go to files outside the working
directory (bounded by the file-size limit), of which the first few KB are
kept.

This is a guard against accidents of generated code (infinite loops, memory
bombs, stray files), not a security boundary: the program runs as this user
with network and filesystem access, and a process that starts its own
session escapes the group kill. Run it in a container for hostile code.

`doctest_program` turns a generated function into a program that passes
exactly when the function passes the doctests of its module's original
docstring; `pass_rate` runs many programs on a small thread pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
import dataclasses
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

# Bytes of stdout and of stderr kept in a SandboxResult.
MAX_OUTPUT_BYTES = 4096
# Largest file the program may write (its stdout/stderr files included).
MAX_FILE_BYTES = 16 * 1024 * 1024
_MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What a sandboxed program did."""

  passed: bool  # Exit status 0 and not timed out.
  returncode: int  # Negative: killed by that signal (-9 after a timeout).
  timed_out: bool
  stdout: str  # At most MAX_OUTPUT_BYTES bytes of each stream, decoded.
  stderr: str
  # The last MAX_OUTPUT_BYTES bytes of stdout (where a harness that appends
  # its own output after the program's finds it).
  stdout_tail: str = ''


def _set_limit(kind: int, value: int) -> None:
  """Sets soft and hard limits, never above the inherited hard limit."""
  _, hard = resource.getrlimit(kind)
  if hard != resource.RLIM_INFINITY:
    value = min(value, hard)
  resource.setrlimit(kind, (value, value))


def _limits(memory_mb: int, cpu_s: int) -> Callable[[], None]:
  """The child-side setup: resource limits (runs between fork and exec)."""

  def preexec() -> None:
    _set_limit(resource.RLIMIT_AS, memory_mb * _MiB)
    soft_cpu = cpu_s
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    hard_cpu = cpu_s + 1 if hard == resource.RLIM_INFINITY else min(
        cpu_s + 1, hard)
    # SIGXCPU at the soft limit, SIGKILL at the hard one.
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft_cpu, hard_cpu), hard_cpu))
    _set_limit(resource.RLIMIT_FSIZE, MAX_FILE_BYTES)
    _set_limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every process of the user and does not bind root,
    # so it is no reliable fork-bomb guard here; the group kill is.

  return preexec


def _read_head(path: str) -> str:
  with open(path, 'rb') as f:
    data = f.read(MAX_OUTPUT_BYTES)
  return data.decode('utf-8', errors='replace')


def _read_tail(path: str) -> str:
  with open(path, 'rb') as f:
    f.seek(max(0, os.path.getsize(path) - MAX_OUTPUT_BYTES))
    data = f.read(MAX_OUTPUT_BYTES)
  return data.decode('utf-8', errors='replace')


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
  """Waits for child `pid` to exit without reaping it; False on timeout."""
  deadline = time.monotonic() + timeout_s
  delay = 0.001
  while True:
    info = os.waitid(os.P_PID, pid,
                     os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is not None:
      return True
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    time.sleep(min(delay, remaining))
    delay = min(2 * delay, 0.02)


def run_python(source: str, *, timeout_s: float = 5.0,
               memory_mb: int = 512) -> SandboxResult:
  """Runs `source` as a Python program in the sandbox; see the module doc."""
  if timeout_s <= 0:
    raise ValueError(f'timeout_s={timeout_s} must be > 0.')
  if memory_mb < 32:
    raise ValueError(f'memory_mb={memory_mb} must be >= 32 (an interpreter '
                     'needs ~20 MB of address space to start).')
  with tempfile.TemporaryDirectory(prefix='calm_sandbox_') as root:
    workdir = os.path.join(root, 'work')
    os.mkdir(workdir)
    program = os.path.join(root, 'program.py')
    with open(program, 'w', encoding='utf-8') as f:
      f.write(source)
    env = {
        'PATH': '/usr/bin:/bin',
        'HOME': workdir,
        'TMPDIR': workdir,
        'LANG': 'C.UTF-8',
        'LC_ALL': 'C.UTF-8',
    }
    out_path = os.path.join(root, 'stdout')
    err_path = os.path.join(root, 'stderr')
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
      proc = subprocess.Popen(
          [sys.executable, '-I', program],
          cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
          stderr=err, start_new_session=True, close_fds=True,
          preexec_fn=_limits(memory_mb, math.ceil(timeout_s) + 1))
    timed_out = not _wait_unreaped(proc.pid, timeout_s)
    # Kill the group (whatever the program left running in it too) while the
    # unreaped leader still holds its id, so that the id cannot have been
    # reused by another process group; then reap.
    _kill_group(proc.pid)
    returncode = proc.wait()
    stdout, stderr = _read_head(out_path), _read_head(err_path)
    tail = _read_tail(out_path)
  return SandboxResult(passed=returncode == 0 and not timed_out,
                       returncode=returncode, timed_out=timed_out,
                       stdout=stdout, stderr=stderr, stdout_tail=tail)


_DOCTEST_TEMPLATE = '''\
import doctest
import importlib
import sys

MODULE = {module!r}
NAME = {name!r}
SOURCE = {source!r}
TESTS = {tests!r}
FILENAME = '<candidate>'


def main() -> int:
  module = importlib.import_module(MODULE)
  namespace = module.__dict__
  # Defined in the module's namespace, so the function sees its globals (and
  # the module's own calls reach the candidate).
  exec(compile(SOURCE, FILENAME, 'exec'), namespace)
  function = namespace.get(NAME)
  code = getattr(function, '__code__', None)
  if code is None or code.co_filename != FILENAME:
    print(f'The candidate source does not define {{NAME!r}}.')
    return 1
  globs = dict(namespace)
  globs[NAME] = function
  test = doctest.DocTestParser().get_doctest(
      TESTS, globs, NAME, FILENAME, 0)
  runner = doctest.DocTestRunner(
      verbose=False,
      optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  result = runner.run(test)
  if result.attempted == 0:
    print('No doctest examples were run.')
    return 1
  print(f'doctest: {{result.attempted - result.failed}}/{{result.attempted}} '
        'passed.')
  return 1 if result.failed else 0


if __name__ == '__main__':
  sys.exit(main())
'''


def doctest_program(module: str, name: str, function_source: str,
                    tests: str) -> str:
  """A program that exits 0 iff `function_source` passes the doctests.

  It imports `module`, executes `function_source` (a top-level `def name`)
  in the module's namespace, then runs the doctest examples of `tests` with
  the module's globals and `name` bound to the new function (ELLIPSIS and
  NORMALIZE_WHITESPACE). Any failure or exception, a source that does not
  define `name`, or no examples at all exit 1.
  """
  if not module or not name:
    raise ValueError(f'module={module!r} and name={name!r} must be non-empty '
                     '(examples without an importable module have no tests).')
  return _DOCTEST_TEMPLATE.format(module=module, name=name,
                                  source=function_source, tests=tests)


def run_many(programs: Sequence[str], *, timeout_s: float = 5.0,
             memory_mb: int = 512, max_workers: int = 2
             ) -> list[SandboxResult]:
  """Runs each program in the sandbox, a few at a time; in order."""
  if max_workers < 1:
    raise ValueError(f'max_workers={max_workers} must be >= 1.')
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    return list(pool.map(
        lambda p: run_python(p, timeout_s=timeout_s, memory_mb=memory_mb),
        programs))


def pass_rate(programs: Sequence[str], *, timeout_s: float = 5.0,
              memory_mb: int = 512, max_workers: int = 2) -> list[bool]:
  """Runs each program in the sandbox; returns whether each passed."""
  return [r.passed for r in run_many(programs, timeout_s=timeout_s,
                                     memory_mb=memory_mb,
                                     max_workers=max_workers)]
