"""Runs untrusted, model-written Python for the pass-rate metrics.

Each program runs under bubblewrap (Debian's `bubblewrap`, `bwrap`):

  * new user, PID, network, IPC, UTS and cgroup namespaces: no network (not
    even the host's loopback), no view of other processes, and a fresh
    `/proc` that shows only the sandbox's own;
  * a read-only view of only what Python needs (/usr, /lib*, /bin and the
    interpreter's own prefix), an empty writable `/work` (the working
    directory, also HOME and TMPDIR) and an empty `/tmp`: the caller's
    home, the project checkout and /etc are not there;
  * `python -I` (no PYTHON* variables, no user site, no script directory on
    sys.path), a minimal environment;
  * resource limits: address space (`memory_mb`), CPU seconds, file size,
    no core files, and a process count (a pids cgroup, or RLIMIT_NPROC);
  * on timeout the whole namespace is killed (bwrap's init dies with its
    parent, and every process of a PID namespace dies with its init), so a
    `setsid` child cannot outlive it.

The harness, not the child, decides pass or fail: `run_tests` hands the
program a random nonce on stdin, and a test program (`doctest_program`,
`humaneval.program`) reports `<nonce> <attempted> <failed>` through a write
captured before the candidate's code ran, only once its tests have run. An
early `exit(0)`, `os._exit(0)` or a patched test runner therefore fails.
This guards against what model-written code does by accident; it is not a
proof against code that sets out to find the nonce in its own interpreter.

Without bubblewrap, the metrics that run code are refused
(`check_available`), unless the config sets `eval.sandbox.unsafe=True`:
then programs run in a plain subprocess with the same limits but no
namespaces (a guard against accidents only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
import dataclasses
import functools
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Bytes of stdout and of stderr kept in a SandboxResult.
MAX_OUTPUT_BYTES = 4096
# Largest file the program may write (its stdout/stderr files included).
MAX_FILE_BYTES = 16 * 1024 * 1024
# Processes (and threads) the program may have at once.
MAX_PROCESSES = 32
_MiB = 1024 * 1024
# What to install where bubblewrap is missing.
PACKAGE = 'bubblewrap'


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What a sandboxed program did."""

  passed: bool  # Exit status 0 and not timed out (run_tests: its report).
  returncode: int  # Negative: killed by that signal (-9 after a timeout).
  timed_out: bool
  stdout: str  # At most MAX_OUTPUT_BYTES bytes of each stream, decoded.
  stderr: str
  # The last MAX_OUTPUT_BYTES bytes of stdout (where a harness that appends
  # its own output after the program's finds it).
  stdout_tail: str = ''
  # Ran under bubblewrap (else a plain subprocess, `unsafe`).
  isolated: bool = False


# ------------------------------------------------------------ bubblewrap


def _bwrap() -> str | None:
  return shutil.which('bwrap')


@functools.lru_cache(maxsize=1)
def available() -> bool:
  """Whether bubblewrap is installed and can make its namespaces here."""
  bwrap = _bwrap()
  if bwrap is None:
    return False
  try:
    probe = subprocess.run(
        [bwrap, *_binds(), '--unshare-all', '--die-with-parent',
         os.path.realpath(sys.executable), '-I', '-c', 'pass'],
        capture_output=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0


def check_available(unsafe: bool, field: str) -> None:
  """Refuses a metric that runs model-written code without a sandbox."""
  if not unsafe and not available():
    raise ValueError(
        f'{field} runs model-written code, which needs bubblewrap as its '
        f'sandbox, and `bwrap` is {"missing" if _bwrap() is None else "unable to make namespaces here"}: '
        f'apt-get install {PACKAGE} (or set eval.sandbox.unsafe=True to run '
        'it in a plain subprocess, without isolation).')


def _binds() -> list[str]:
  """Read-only binds of what the interpreter needs, and nothing else."""
  prefix = os.path.realpath(sys.base_prefix)
  out = []
  for d in ('/usr', '/lib', '/lib64', '/lib32', '/bin', '/sbin', prefix):
    if os.path.exists(d):
      out += ['--ro-bind', d, d]
  return out


def _bwrap_command(root: str) -> list[str]:
  return [
      _bwrap(), '--unshare-all', '--die-with-parent', '--new-session',
      '--clearenv', '--setenv', 'PATH', '/usr/bin:/bin',
      '--setenv', 'HOME', '/work', '--setenv', 'TMPDIR', '/work',
      '--setenv', 'LANG', 'C.UTF-8', '--setenv', 'LC_ALL', 'C.UTF-8',
      *_binds(), '--proc', '/proc', '--dev', '/dev', '--tmpfs', '/tmp',
      '--bind', os.path.join(root, 'work'), '/work',
      '--ro-bind', os.path.join(root, 'program.py'), '/program.py',
      '--chdir', '/work', os.path.realpath(sys.executable), '-I',
      '/program.py']


# ------------------------------------------------------------ process limit


class _PidsCgroup:
  """A pids cgroup capping the program's processes (when one can be made:
  root in cgroup v1 or v2), removed afterwards."""

  def __init__(self, limit: int):
    self.path = None
    for base in ('/sys/fs/cgroup/pids', '/sys/fs/cgroup'):
      if not os.path.exists(os.path.join(base, 'cgroup.procs')):
        continue
      path = os.path.join(base, f'calm_sandbox_{secrets.token_hex(6)}')
      try:
        os.mkdir(path)
        with open(os.path.join(path, 'pids.max'), 'w') as f:
          f.write(str(limit))
      except OSError:
        try:
          os.rmdir(path)
        except OSError:
          pass
        continue
      self.path = path
      return

  def join(self) -> None:
    """Puts the calling process into the cgroup (between fork and exec)."""
    if self.path:
      with open(os.path.join(self.path, 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))

  def remove(self) -> None:
    if not self.path:
      return
    for _ in range(50):  # Until the last killed process is gone.
      try:
        os.rmdir(self.path)
        return
      except OSError:
        time.sleep(0.02)


def _user_processes() -> int:
  uid = os.getuid()
  count = 0
  for pid in os.listdir('/proc'):
    if pid.isdigit():
      try:
        if os.stat(f'/proc/{pid}').st_uid == uid:
          count += 1
      except OSError:
        pass
  return count


# ------------------------------------------------------------------ runner


def _set_limit(kind: int, value: int) -> None:
  """Sets soft and hard limits, never above the inherited hard limit."""
  _, hard = resource.getrlimit(kind)
  if hard != resource.RLIM_INFINITY:
    value = min(value, hard)
  resource.setrlimit(kind, (value, value))


def _limits(memory_mb: int, cpu_s: int, nproc: int | None,
            cgroup: _PidsCgroup) -> Callable[[], None]:
  """The child-side setup: resource limits (runs between fork and exec)."""

  def preexec() -> None:
    cgroup.join()
    _set_limit(resource.RLIMIT_AS, memory_mb * _MiB)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    hard_cpu = cpu_s + 1 if hard == resource.RLIM_INFINITY else min(
        cpu_s + 1, hard)
    # SIGXCPU at the soft limit, SIGKILL at the hard one.
    resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_s, hard_cpu), hard_cpu))
    _set_limit(resource.RLIMIT_FSIZE, MAX_FILE_BYTES)
    _set_limit(resource.RLIMIT_CORE, 0)
    if nproc is not None:
      _set_limit(resource.RLIMIT_NPROC, nproc)

  return preexec


def _read(path: str, tail: bool = False) -> str:
  with open(path, 'rb') as f:
    if tail:
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
    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
      return True
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    time.sleep(min(delay, remaining))
    delay = min(2 * delay, 0.02)


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               max_processes: int = MAX_PROCESSES, stdin: str = '',
               unsafe: bool = False) -> SandboxResult:
  """Runs `source` as a Python program in the sandbox; see the module doc.

  `unsafe=True` runs it in a plain subprocess when bubblewrap is missing
  (otherwise that is an error).
  """
  if timeout_s <= 0:
    raise ValueError(f'timeout_s={timeout_s} must be > 0.')
  if memory_mb < 32:
    raise ValueError(f'memory_mb={memory_mb} must be >= 32 (an interpreter '
                     'needs ~20 MB of address space to start).')
  isolated = available()
  if not isolated and not unsafe:
    check_available(False, 'run_python')
  with tempfile.TemporaryDirectory(prefix='calm_sandbox_') as root:
    workdir = os.path.join(root, 'work')
    os.mkdir(workdir)
    program = os.path.join(root, 'program.py')
    with open(program, 'w', encoding='utf-8') as f:
      f.write(source)
    if isolated:
      cmd, cwd, env = _bwrap_command(root), root, {}
    else:
      cmd = [sys.executable, '-I', program]
      cwd = workdir
      env = {'PATH': '/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
             'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8'}
    cgroup = _PidsCgroup(max_processes)
    # Without a cgroup, RLIMIT_NPROC counts all of this user's processes
    # (and does not bind root): allow this many more.
    nproc = (None if cgroup.path or os.getuid() == 0 else
             _user_processes() + max_processes)
    out_path = os.path.join(root, 'stdout')
    err_path = os.path.join(root, 'stderr')
    try:
      with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
            stderr=err, start_new_session=True, close_fds=True,
            preexec_fn=_limits(memory_mb, math.ceil(timeout_s) + 1, nproc,
                               cgroup))
        try:
          proc.stdin.write(stdin.encode())
          proc.stdin.close()
        except BrokenPipeError:
          pass
      timed_out = not _wait_unreaped(proc.pid, timeout_s)
      # Kill the group (and with bwrap's init the whole namespace) while
      # the unreaped leader still holds its id, so that the id cannot have
      # been reused by another process group; then reap.
      _kill_group(proc.pid)
      returncode = proc.wait()
    finally:
      cgroup.remove()
    stdout, stderr = _read(out_path), _read(err_path)
    tail = _read(out_path, tail=True)
  return SandboxResult(passed=returncode == 0 and not timed_out,
                       returncode=returncode, timed_out=timed_out,
                       stdout=stdout, stderr=stderr, stdout_tail=tail,
                       isolated=isolated)


# ---------------------------------------------------------------- test runs

# The first lines of every test program: read the run's nonce from stdin
# and keep a write to stdout that the candidate's code cannot patch.
REPORT_HEADER = '''\
import os as _calm_os
import sys as _calm_sys


def _calm_reporter():
  nonce = _calm_sys.stdin.readline().strip()
  write = _calm_os.write

  def report(attempted, failed):
    write(1, ('\\n%s %d %d\\n' % (nonce, attempted, failed)).encode())
  return report


_calm_report = _calm_reporter()
del _calm_reporter
'''


def run_tests(source: str, **kwargs) -> SandboxResult:
  """Runs a test program (REPORT_HEADER first); it passes only if it
  reported, after its tests ran, some attempted and none failed."""
  nonce = secrets.token_hex(16)
  result = run_python(source, stdin=nonce + '\n', **kwargs)
  passed = False
  for line in result.stdout_tail.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[0] == nonce:
      attempted, failed = int(parts[1]), int(parts[2])
      passed = attempted > 0 and failed == 0 and not result.timed_out
  return dataclasses.replace(result, passed=passed)


_DOCTEST_TEMPLATE = REPORT_HEADER + '''
import doctest
import importlib

MODULE = {module!r}
NAME = {name!r}
SOURCE = {source!r}
TESTS = {tests!r}
FILENAME = '<candidate>'
# Taken before the candidate runs: patching doctest later changes nothing.
_RUNNER, _RUN, _PARSER = (doctest.DocTestRunner, doctest.DocTestRunner.run,
                          doctest.DocTestParser)
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def main():
  module = importlib.import_module(MODULE)
  namespace = module.__dict__
  # Defined in the module's namespace, so the function sees its globals (and
  # the module's own calls reach the candidate).
  exec(compile(SOURCE, FILENAME, 'exec'), namespace)
  function = namespace.get(NAME)
  code = getattr(function, '__code__', None)
  if code is None or code.co_filename != FILENAME:
    print(f'The candidate source does not define {{NAME!r}}.')
    return
  globs = dict(namespace)
  globs[NAME] = function
  test = _PARSER().get_doctest(TESTS, globs, NAME, FILENAME, 0)
  runner = _RUNNER(verbose=False, optionflags=_FLAGS)
  result = _RUN(runner, test)
  if result.attempted == 0:
    print('No doctest examples were run.')
  print(f'doctest: {{result.attempted - result.failed}}/{{result.attempted}} '
        'passed.')
  _calm_report(result.attempted, result.failed)


main()
'''


def doctest_program(module: str, name: str, function_source: str,
                    tests: str) -> str:
  """A test program: `function_source` against the doctests of `tests`.

  It imports `module`, executes `function_source` (a top-level `def name`)
  in the module's namespace, then runs the doctest examples of `tests` with
  the module's globals and `name` bound to the new function (ELLIPSIS and
  NORMALIZE_WHITESPACE), and reports attempted and failed examples
  (`run_tests`). A source that does not define `name`, an exception or no
  examples report nothing or nothing attempted: a fail.
  """
  if not module or not name:
    raise ValueError(f'module={module!r} and name={name!r} must be non-empty '
                     '(examples without an importable module have no tests).')
  return _DOCTEST_TEMPLATE.format(module=module, name=name,
                                  source=function_source, tests=tests)


def run_many(programs: Sequence[str], *, tests: bool = True,
             timeout_s: float = 5.0, memory_mb: int = 512,
             max_workers: int = 2, unsafe: bool = False
             ) -> list[SandboxResult]:
  """Runs each program in the sandbox, a few at a time; in order.

  `tests`: they are test programs, judged by their report (`run_tests`).
  """
  if max_workers < 1:
    raise ValueError(f'max_workers={max_workers} must be >= 1.')
  run = run_tests if tests else run_python
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    return list(pool.map(
        lambda p: run(p, timeout_s=timeout_s, memory_mb=memory_mb,
                      unsafe=unsafe), programs))


def pass_rate(programs: Sequence[str], **kwargs) -> list[bool]:
  """Whether each test program passed (see `run_many`)."""
  return [r.passed for r in run_many(programs, **kwargs)]
