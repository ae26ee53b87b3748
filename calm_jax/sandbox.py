"""Runs untrusted, model-written Python for the pass-rate metrics.

Each program runs under bubblewrap (Debian's `bubblewrap`, `bwrap`):

  * new user, PID, network, IPC, UTS and cgroup namespaces: no network (not
    even the host's loopback), no view of other processes, and a fresh
    `/proc` that shows only the sandbox's own;
  * no capabilities, and never root: run by root, bwrap makes no user
    namespace (root needs none) and the program runs as a uid of its own
    (`_fresh_uid`). As root in a user namespace it would keep every
    capability there: it could remount the read-only binds read-write and
    write the host's /usr as root;
  * a read-only view of only what Python needs (/usr, /lib*, /bin and the
    interpreter's own prefix), an empty writable `/work` (the working
    directory, also HOME and TMPDIR) and an empty `/tmp`: the caller's
    home, the project checkout and /etc are not there;
  * `python -I` (no PYTHON* variables, no user site, no script directory on
    sys.path), a minimal environment;
  * resource limits: address space (`memory_mb`), CPU seconds, file size,
    no core files, and a process count: a pids cgroup where one can be
    made, and RLIMIT_NPROC (which never binds root: hence, as root, the
    uid of its own, which also makes the count that run's processes alone);
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
namespaces (a guard against accidents only). Run by root, that subprocess
runs as a uid of its own where the interpreter lets an unprivileged user
run it, else as root in a pids cgroup; with neither, nothing would limit
its processes, and the run is refused.
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
# A program run by root runs as a uid of this range (no account's: far
# above the usual ranges, subuid ranges included), a fresh one each run.
_UID_BASE = 0x4000_0000
_UID_RANGE = 1 << 24
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
  """Whether bubblewrap is installed and can make its sandbox here.

  The probe runs `pass` with the command line, limits and (as root) change
  of uid that every run uses, so that what it accepts is what runs.
  """
  if _bwrap() is None:
    return False
  try:
    probe = _run('pass', isolated=True, timeout_s=30.0, memory_mb=512,
                 max_processes=MAX_PROCESSES, stdin='')
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0 and not probe.timed_out


def check_available(unsafe: bool, field: str) -> None:
  """Refuses a metric that runs model-written code without a sandbox, or
  (unsafe, as root) with nothing to limit its number of processes."""
  if available():
    return
  if not unsafe:
    why = ('missing' if _bwrap() is None else
           'unable to make its sandbox here')
    raise ValueError(
        f'{field} runs model-written code, which needs bubblewrap as its '
        f'sandbox, and `bwrap` is {why}: '
        f'apt-get install {PACKAGE} (or set eval.sandbox.unsafe=True to run '
        'it in a plain subprocess, without isolation).')
  if _is_root() and not _unprivileged_python():
    cgroup = _PidsCgroup(MAX_PROCESSES)
    cgroup.remove()
    if not cgroup.path:
      raise ValueError(_no_process_limit(field))


def _binds() -> list[str]:
  """Read-only binds of what the interpreter needs, and nothing else.

  The directories above the interpreter's prefix are made 0755 first: bwrap
  would copy their modes (/root is 0700), and a program run as a uid of its
  own could not reach an interpreter under them.
  """
  prefix = os.path.realpath(sys.base_prefix)
  parents = []
  parent = os.path.dirname(prefix)
  while parent != os.path.dirname(parent):  # Up to, not including, '/'.
    parents.append(parent)
    parent = os.path.dirname(parent)
  out = []
  for d in reversed(parents):
    out += ['--perms', '0755', '--dir', d]
  for d in ('/usr', '/lib', '/lib64', '/lib32', '/bin', '/sbin', prefix):
    if os.path.exists(d):
      out += ['--ro-bind', d, d]
  return out


# Run by root, the sandbox's first process becomes the run's uid (a setuid
# from root to another uid clears every capability), then the program.
_BECOME = (
    'import os\n'
    'os.setgroups([])\n'
    'os.setgid({uid})\n'
    'os.setuid({uid})\n'
    'os.execv({exe!r}, [{exe!r}, "-I", "/program.py"])\n')


def _bwrap_command(root: str, uid: int | None) -> list[str]:
  """bwrap running <root>/program.py in /work (<root>/work).

  `uid`: run by root. bwrap then makes no user namespace (as root it needs
  none, and in one the program would be root with every capability there),
  keeps only the capabilities to change uid, and the program runs as `uid`
  with none; /tmp is then <root>/tmp, owned by `uid`.
  """
  exe = os.path.realpath(sys.executable)
  if uid is None:
    namespaces = ['--unshare-all']
    tmp = ['--tmpfs', '/tmp']
    program = [exe, '-I', '/program.py']
  else:
    namespaces = ['--unshare-ipc', '--unshare-pid', '--unshare-net',
                  '--unshare-uts', '--unshare-cgroup-try', '--cap-drop',
                  'ALL', '--cap-add', 'CAP_SETUID', '--cap-add', 'CAP_SETGID']
    tmp = ['--bind', os.path.join(root, 'tmp'), '/tmp']
    program = [exe, '-I', '-c', _BECOME.format(uid=uid, exe=exe)]
  return [
      _bwrap(), *namespaces, '--die-with-parent', '--new-session',
      '--clearenv', '--setenv', 'PATH', '/usr/bin:/bin',
      '--setenv', 'HOME', '/work', '--setenv', 'TMPDIR', '/work',
      '--setenv', 'LANG', 'C.UTF-8', '--setenv', 'LC_ALL', 'C.UTF-8',
      *_binds(), '--proc', '/proc', '--dev', '/dev', *tmp,
      '--bind', os.path.join(root, 'work'), '/work',
      '--ro-bind', os.path.join(root, 'program.py'), '/program.py',
      '--chdir', '/work', *program]


# ------------------------------------------------------------ process limit


class _PidsCgroup:
  """A pids cgroup capping the program's processes (when one can be made:
  root in cgroup v1 or v2), removed afterwards."""

  # Where to make it: cgroup v1's pids hierarchy, or the v2 root.
  BASES = ('/sys/fs/cgroup/pids', '/sys/fs/cgroup')

  def __init__(self, limit: int):
    self.path = None
    for base in self.BASES:
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


def _is_root() -> bool:
  return os.getuid() == 0


def _fresh_uid() -> int:
  """A uid (and gid) of no account, for one run by root: RLIMIT_NPROC binds
  it (never root), and counts that run's processes alone."""
  start, stop = _id_range()
  return start + secrets.randbelow(stop - start)


def _id_maps() -> list[str]:
  """This user namespace's uid_map and gid_map."""
  out = []
  for path in ('/proc/self/uid_map', '/proc/self/gid_map'):
    with open(path) as f:
      out.append(f.read())
  return out


def _id_range() -> tuple[int, int]:
  """Where `_fresh_uid` picks: [_UID_BASE, _UID_BASE + _UID_RANGE) if this
  user namespace maps those uids and gids (the initial one maps all), else
  the top 4096 of the largest span it maps (a rootless container maps some
  65536), short of the span's last id (often nobody's)."""
  wanted = (_UID_BASE, _UID_BASE + _UID_RANGE)
  try:
    maps = _id_maps()
  except OSError:
    return wanted
  spans = None
  for text in maps:
    mapped = [(int(first), int(first) + int(count))
              for first, _, count in (line.split() for line in
                                      text.splitlines() if line.strip())]
    spans = mapped if spans is None else [
        (max(a, c), min(b, d)) for a, b in spans for c, d in mapped
        if max(a, c) < min(b, d)]
  if any(a <= wanted[0] and wanted[1] <= b for a, b in spans):
    return wanted
  a, b = max(spans, key=lambda span: span[1] - span[0], default=(0, 0))
  start, stop = max(a, 1, b - 1 - 4096), b - 1
  if start >= stop:
    raise OSError(f'This user namespace maps no uid but root ({spans}): '
                  'there is no uid to run a program as.')
  return start, stop


def _become(uid: int) -> None:
  """Drops root for `uid`, and every capability with it."""
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)


@functools.lru_cache(maxsize=1)
def _unprivileged_python() -> bool:
  """Whether this interpreter runs as a uid of no account (for unsafe runs
  by root: not when it lives under a directory only root may enter, such as
  /root, as pyenv's do)."""
  try:
    uid = _fresh_uid()
    probe = subprocess.run(
        [sys.executable, '-I', '-c', 'pass'], cwd='/', env={},
        capture_output=True, timeout=30, check=False,
        preexec_fn=lambda: _become(uid))
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0


def _no_process_limit(field: str) -> str:
  bases = ' or '.join(_PidsCgroup.BASES) or 'nowhere'
  return (
      f'{field}: nothing can limit the number of processes of an unsafe run '
      '(a plain subprocess) here: it runs as root, which RLIMIT_NPROC does '
      f'not bind; no pids cgroup can be made (under {bases}); and '
      f'{sys.executable} cannot run as an unprivileged uid (a directory on '
      'its path is closed to other users). Install bubblewrap (apt-get '
      f'install {PACKAGE}), run as a non-root user, make a pids cgroup '
      'writable (e.g. cgroup v2 mounted read-write), or install Python where '
      'other users can read it.')


# ------------------------------------------------------------------ runner


def _set_limit(kind: int, value: int) -> None:
  """Sets soft and hard limits, never above the inherited hard limit."""
  _, hard = resource.getrlimit(kind)
  if hard != resource.RLIM_INFINITY:
    value = min(value, hard)
  resource.setrlimit(kind, (value, value))


def _limits(memory_mb: int, cpu_s: int, nproc: int | None,
            cgroup: _PidsCgroup, uid: int | None = None
            ) -> Callable[[], None]:
  """The child-side setup: resource limits, then (`uid`) dropping root
  (runs between fork and exec)."""

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
    if uid is not None:
      _become(uid)

  return preexec


def _process_limit(isolated: bool, cgroup: _PidsCgroup, max_processes: int
                   ) -> tuple[int | None, int | None]:
  """The uid to run the program as (None: this one) and its RLIMIT_NPROC
  (None: the cgroup's limit alone); refuses a run that nothing limits."""
  if not _is_root():
    # RLIMIT_NPROC counts all of this user's processes: allow this many more.
    return None, (None if cgroup.path else _user_processes() + max_processes)
  # Root: RLIMIT_NPROC binds only another uid, and a fresh one counts this
  # run's processes alone. Under bwrap the uid can always run Python (bwrap
  # binds it as root); without it, only if its directories let it.
  if isolated or _unprivileged_python():
    return _fresh_uid(), max_processes
  if cgroup.path:
    return None, None
  raise ValueError(_no_process_limit('run_python'))


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
  return _run(source, isolated=isolated, timeout_s=timeout_s,
              memory_mb=memory_mb, max_processes=max_processes, stdin=stdin)


def _run(source: str, *, isolated: bool, timeout_s: float, memory_mb: int,
         max_processes: int, stdin: str) -> SandboxResult:
  """`run_python`, under bubblewrap (`isolated`) or in a plain subprocess."""
  with tempfile.TemporaryDirectory(prefix='calm_sandbox_') as root:
    workdir = os.path.join(root, 'work')
    os.mkdir(workdir)
    program = os.path.join(root, 'program.py')
    with open(program, 'w', encoding='utf-8') as f:
      f.write(source)
    out_path = os.path.join(root, 'stdout')
    err_path = os.path.join(root, 'stderr')
    cgroup = _PidsCgroup(max_processes)
    try:
      uid, nproc = _process_limit(isolated, cgroup, max_processes)
      if uid is not None:  # The program's files, for its uid.
        os.chown(workdir, uid, uid)
        os.chmod(program, 0o644)
        if isolated:
          os.mkdir(os.path.join(root, 'tmp'), 0o700)
          os.chown(os.path.join(root, 'tmp'), uid, uid)
        else:
          os.chmod(root, 0o711)
      if isolated:
        # bwrap, as root, changes uid itself (after its binds).
        cmd, cwd, env, become = _bwrap_command(root, uid), root, {}, None
      else:
        cmd, cwd, become = [sys.executable, '-I', program], workdir, uid
        env = {'PATH': '/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
               'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8'}
      with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
            stderr=err, start_new_session=True, close_fds=True,
            preexec_fn=_limits(memory_mb, math.ceil(timeout_s) + 1, nproc,
                               cgroup, become))
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
