"""Tests for calm_jax.sandbox: limits, isolation and the doctest programs."""

import inspect
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest

from calm_jax import sandbox

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Forks (each child sleeps, so they add up) until a fork fails; prints how
# many it made.
_FORK_BOMB = '''\
import os, time
n = 0
for _ in range(128):
  try:
    pid = os.fork()
  except OSError:
    break
  if pid == 0:
    time.sleep(2)
    os._exit(0)
  n += 1
print(n, flush=True)
'''

# Looks for the secret (its stdin) in every /proc/<pid>/environ it can read
# and in its own environment.
_ENVIRON_PROBE = '''\
import json, os, sys
secret = sys.stdin.read().strip()
pids = [p for p in os.listdir('/proc') if p.isdigit()]
found = []
for pid in pids:
  try:
    with open(f'/proc/{pid}/environ', 'rb') as f:
      if secret.encode() in f.read():
        found.append(int(pid))
  except OSError:
    pass
own = any(secret in f'{k}={v}' for k, v in os.environ.items())
print(json.dumps({'found': found, 'own': own, 'pids': len(pids)}))
'''

# Run as a process whose environment holds the secret from its exec on:
# the probe (argv[1]) in the sandbox and, the control, the same probe in a
# plain subprocess with an empty environment.
_SECRET_HOLDER = '''\
import json, os, subprocess, sys
from calm_jax import sandbox
probe, secret = sys.argv[1], os.environ['CALM_SANDBOX_SECRET']
boxed = sandbox.run_python(probe, stdin=secret + '\\n')
plain = subprocess.run([sys.executable, '-I', '-c', probe], env={},
                       input=secret + '\\n', capture_output=True, text=True)
print(json.dumps({
    'pid': os.getpid(),
    'boxed': {'isolated': boxed.isolated, 'stdout': boxed.stdout,
              'stderr': boxed.stderr},
    'plain': {'stdout': plain.stdout, 'stderr': plain.stderr}}))
'''


def _mean_parts() -> tuple[str, str]:
  """The true source of statistics.mean and its doctest text."""
  source = inspect.getsource(statistics.mean)
  tests = inspect.cleandoc(statistics.mean.__doc__)
  return source, tests


def _sleepers(marker: str, wait_s: float = 2.0) -> list[int]:
  """Host pids of live `sleep <marker>` processes, after up to `wait_s`."""
  deadline = time.monotonic() + wait_s
  while True:
    found = []
    for pid in os.listdir('/proc'):
      if not pid.isdigit():
        continue
      try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
          argv = f.read().split(b'\0')
        if argv[:2] == [b'sleep', marker.encode()] and _process_state(
            int(pid)) not in (None, 'Z'):
          found.append(int(pid))
      except OSError:
        pass
    if not found or time.monotonic() > deadline:
      return found
    time.sleep(0.05)


def _process_state(pid: int) -> str | None:
  """The /proc state letter of `pid` ('Z' = zombie), None if gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('State:'):
          return line.split()[1]
  except FileNotFoundError:
    return None
  return None


class RunPythonTest(absltest.TestCase):

  def test_passing_program(self):
    result = sandbox.run_python('import json\nprint(json.dumps([1, 2]))')
    self.assertTrue(result.passed)
    self.assertEqual(result.returncode, 0)
    self.assertFalse(result.timed_out)
    self.assertEqual(result.stdout, '[1, 2]\n')

  def test_failing_assert(self):
    result = sandbox.run_python('assert 1 + 1 == 3, "bad sum"')
    self.assertFalse(result.passed)
    self.assertEqual(result.returncode, 1)
    self.assertIn('AssertionError: bad sum', result.stderr)

  def test_isolated_environment(self):
    os.environ['CALM_SANDBOX_SECRET'] = 'leak'
    try:
      result = sandbox.run_python(
          'import os, sys\n'
          'print(os.environ.get("CALM_SANDBOX_SECRET"))\n'
          'print(sys.flags.isolated)\n'
          'print(sys.stdin.read() == "")\n')
    finally:
      del os.environ['CALM_SANDBOX_SECRET']
    self.assertTrue(result.passed, result.stderr)
    self.assertEqual(result.stdout.split(), ['None', '1', 'True'])

  def test_infinite_loop_killed_with_its_children(self):
    start = time.monotonic()
    marker = f'{61 + os.getpid() % 1000 / 1000:.3f}'  # A unique sleep.
    result = sandbox.run_python(
        'import subprocess, sys\n'
        f'child = subprocess.Popen(["sleep", "{marker}"])\n'
        'print(child.pid, flush=True)\n'
        'while True:\n'
        '  pass\n', timeout_s=1.0)
    elapsed = time.monotonic() - start
    self.assertTrue(result.timed_out)
    self.assertFalse(result.passed)
    self.assertEqual(result.returncode, -9)
    self.assertLess(elapsed, 4.0)
    # Killed too (a zombie at most, if nothing reaps orphans here).
    self.assertEqual(_sleepers(marker), [])

  def test_sleeping_program_times_out(self):
    start = time.monotonic()
    result = sandbox.run_python('import time\ntime.sleep(30)', timeout_s=0.5)
    self.assertTrue(result.timed_out)
    self.assertLess(time.monotonic() - start, 3.0)

  def test_memory_limit(self):
    bomb = 'x = bytearray(1024 * 1024 * 1024)\nprint("allocated")'
    result = sandbox.run_python(bomb, memory_mb=256)
    self.assertFalse(result.passed)
    self.assertFalse(result.timed_out)
    self.assertIn('MemoryError', result.stderr)
    self.assertNotIn('allocated', result.stdout)
    # Within the limit the same kind of program runs.
    small = 'x = bytearray(64 * 1024 * 1024)\nprint("allocated")'
    result = sandbox.run_python(small, memory_mb=512)
    self.assertTrue(result.passed, result.stderr)

  def test_file_size_limit(self):
    """A file may grow to MAX_FILE_BYTES and no further (sparse writes at
    those offsets: one byte each, not 16 MiB)."""
    result = sandbox.run_python(
        'import os\n'
        'fd = os.open("big", os.O_WRONLY | os.O_CREAT)\n'
        f'os.pwrite(fd, b"x", {sandbox.MAX_FILE_BYTES - 1})\n'
        'print("up to the limit", flush=True)\n'
        f'os.pwrite(fd, b"x", {sandbox.MAX_FILE_BYTES})\n'
        'print("beyond it")\n')
    self.assertFalse(result.passed)
    self.assertEqual(result.stdout, 'up to the limit\n')
    self.assertIn('File too large', result.stderr)

  def test_cpu_time_limit(self):
    """A busy loop is stopped by its CPU seconds, not by the wall clock.

    A run's CPU limit is its timeout + 1 s, which a one-thread loop never
    reaches before the timeout: here the limit is lowered to 1 s (this tests
    that RLIMIT_CPU reaches the program, not that arithmetic). A sleep of
    longer than that under the same limit passes: it is CPU time.
    """
    limits = sandbox._limits

    def one_cpu_second(memory_mb, cpu_s, *args):
      del cpu_s
      return limits(memory_mb, 1, *args)

    with mock.patch.object(sandbox, '_limits', one_cpu_second):
      start = time.monotonic()
      result = sandbox.run_python(
          'print("looping", flush=True)\nwhile True:\n  pass\n',
          timeout_s=20.0)
      elapsed = time.monotonic() - start
      sleeper = sandbox.run_python('import time\ntime.sleep(1.5)',
                                   timeout_s=20.0)
    self.assertFalse(result.timed_out)
    self.assertFalse(result.passed)
    self.assertEqual(result.stdout, 'looping\n')
    # Killed by SIGXCPU (bwrap exits 128 + the signal that killed its child).
    self.assertIn(result.returncode, (-24, 128 + 24))
    self.assertLess(elapsed, 15.0)
    self.assertTrue(sleeper.passed, sleeper.stderr)

  def test_writes_land_in_temp_dir(self):
    name = 'calm_sandbox_probe.txt'
    result = sandbox.run_python(
        'import os\n'
        f'open({name!r}, "w").write("x")\n'
        'print(os.getcwd())\n')
    self.assertTrue(result.passed, result.stderr)
    self.assertEqual(result.stdout.strip(), '/work')  # Its own, empty.
    self.assertFalse(os.path.exists(name))
    self.assertFalse(os.path.exists(os.path.join('/work', name)))

  def test_output_truncated(self):
    result = sandbox.run_python('print("y" * 100_000)')
    self.assertTrue(result.passed)
    self.assertLen(result.stdout, sandbox.MAX_OUTPUT_BYTES)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'timeout_s'):
      sandbox.run_python('pass', timeout_s=0)
    with self.assertRaisesRegex(ValueError, 'memory_mb'):
      sandbox.run_python('pass', memory_mb=1)


class DoctestProgramTest(absltest.TestCase):

  def test_true_source_passes(self):
    source, tests = _mean_parts()
    self.assertIn('>>>', tests)
    result = sandbox.run_tests(
        sandbox.doctest_program('statistics', 'mean', source, tests))
    self.assertTrue(result.passed, result.stdout + result.stderr)
    self.assertRegex(result.stdout, r'doctest: (\d+)/\1 passed')

  def test_wrong_body_fails(self):
    source, tests = _mean_parts()
    header = source[:source.index('    T, total, n = _sum(data)')]
    wrong = header + '    return 0\n'
    result = sandbox.run_tests(
        sandbox.doctest_program('statistics', 'mean', wrong, tests))
    self.assertFalse(result.passed)
    self.assertIn('Failed example', result.stdout)

  def test_raising_body_fails(self):
    source, tests = _mean_parts()
    header = source[:source.index('    T, total, n = _sum(data)')]
    result = sandbox.run_tests(sandbox.doctest_program(
        'statistics', 'mean', header + '    raise ZeroDivisionError\n', tests))
    self.assertFalse(result.passed)

  def test_other_name_or_no_examples_fail(self):
    source, tests = _mean_parts()
    # Defines `average`, so `mean` would still be the original: must fail.
    renamed = source.replace('def mean(', 'def average(', 1)
    result = sandbox.run_tests(
        sandbox.doctest_program('statistics', 'mean', renamed, tests))
    self.assertFalse(result.passed)
    self.assertIn('does not define', result.stdout)
    result = sandbox.run_tests(sandbox.doctest_program(
        'statistics', 'mean', source, 'Just prose, no examples.'))
    self.assertFalse(result.passed)
    self.assertIn('No doctest examples', result.stdout)

  def test_syntax_error_fails(self):
    _, tests = _mean_parts()
    result = sandbox.run_tests(sandbox.doctest_program(
        'statistics', 'mean', 'def mean(data):\n  return (\n', tests))
    self.assertFalse(result.passed)
    self.assertIn('SyntaxError', result.stderr)

  def test_requires_module_and_name(self):
    with self.assertRaisesRegex(ValueError, 'module'):
      sandbox.doctest_program('', 'mean', 'def mean(): pass', '>>> 1\n1')


class PassRateTest(absltest.TestCase):

  def test_order_and_values(self):
    report = sandbox.REPORT_HEADER + '\n_calm_report(1, 0)\n'
    programs = [report, 'raise SystemExit(3)', 'print(1)',
                report.replace('_calm_report(1, 0)', '_calm_report(2, 1)'),
                'import time\ntime.sleep(10)\n' + report]
    # Test programs pass only by their report: not by exiting 0.
    self.assertEqual(
        sandbox.pass_rate(programs, timeout_s=1.0, max_workers=2),
        [True, False, False, False, False])
    self.assertEqual(sandbox.run_many(programs[:3], tests=False,
                                      timeout_s=1.0)[2].passed, True)
    self.assertEqual(sandbox.pass_rate([]), [])


class BoundaryTest(absltest.TestCase):
  """The probes that a plain subprocess let through, each contained."""

  def setUp(self):
    super().setUp()
    self.assertTrue(sandbox.available(), 'bubblewrap (bwrap) must be '
                    'installed and able to make namespaces: apt-get install '
                    'bubblewrap')

  def _run(self, program, **kwargs):
    result = sandbox.run_python(program, **kwargs)
    self.assertTrue(result.isolated)
    return result

  def test_no_network_not_even_loopback(self):
    with socket.socket() as listener:
      listener.bind(('127.0.0.1', 0))
      listener.listen(1)
      port = listener.getsockname()[1]
      result = self._run(
          'import socket\n'
          'try:\n'
          f'  socket.create_connection(("127.0.0.1", {port}), timeout=2)\n'
          '  print("connected")\n'
          'except OSError as e:\n'
          '  print("refused", type(e).__name__)\n')
    self.assertIn('refused', result.stdout)
    self.assertNotIn('connected', result.stdout)

  def test_no_files_of_the_machine(self):
    """Nothing of the machine is there but the read-only system and Python
    directories: not /etc, the checkout, nor files made for this test in a
    temp dir and in the home directory. Those are checked to lie under no
    bound directory, so the test holds wherever Python lives (it used to
    pass only because Python's prefix hid the home directory's files)."""
    binds = sandbox._binds()
    bound = [binds[i + 1] for i, arg in enumerate(binds) if arg == '--ro-bind']
    token = secrets.token_hex(8)
    outside = tempfile.mkdtemp(prefix='calm_sandbox_outside_')
    self.addCleanup(shutil.rmtree, outside)
    in_home = os.path.join(os.path.expanduser('~'),
                           f'.calm_sandbox_probe_{token}')
    made = [os.path.join(outside, 'secret.txt'), in_home]
    for path in made:
      with open(path, 'w') as f:
        f.write(token)
    self.addCleanup(os.remove, in_home)
    for path in made:
      self.assertFalse(
          any(path.startswith(d.rstrip('/') + '/') for d in bound),
          f'{path} lies under a bound directory ({bound}): this test '
          'cannot tell whether the sandbox hides it.')
    readme = os.path.join(_CHECKOUT, 'README.md')
    self.assertTrue(os.path.exists(readme))
    for path in ('/etc/passwd', readme, __file__, *made):
      with self.subTest(path):
        result = self._run(
            'import os\n'
            f'print(os.path.exists({path!r}), flush=True)\n'
            f'print(open({path!r}).read()[:40])\n')
        self.assertFalse(result.passed)
        self.assertEqual(result.stdout, 'False\n')
        self.assertIn('FileNotFoundError', result.stderr)
    # Nor do their directories list them.
    for path in (readme, *made):
      with self.subTest(f'listing {os.path.dirname(path)}'):
        result = self._run(
            'import os\n'
            'try:\n'
            f'  print(sorted(os.listdir({os.path.dirname(path)!r})))\n'
            'except FileNotFoundError:\n'
            '  print("no such directory")\n')
        self.assertTrue(result.passed, result.stderr)
        self.assertNotIn(os.path.basename(path), result.stdout)

  def test_writes_stay_inside(self):
    name = f'calm_sandbox_escape_{os.getpid()}'
    here = os.path.dirname(os.path.abspath(__file__))
    for target in ('/tmp', '/usr', here):
      with self.subTest(target):
        path = os.path.join(target, name)
        self._run(f'open({path!r}, "w").write("x")')
        self.assertFalse(os.path.exists(path))

  def test_no_view_of_the_callers_processes(self):
    """A secret in the environment of the caller, a process that had it
    from its exec on (what /proc/<pid>/environ shows: a later os.environ
    change never shows there), is in no /proc/*/environ the sandbox sees,
    nor in its own environment, and it sees no process but its own. The
    same probe in a plain subprocess of that caller finds the secret in the
    caller's environ: the probe can fail."""
    secret = f'calm-sandbox-secret-{secrets.token_hex(8)}'
    caller = subprocess.run(
        [sys.executable, '-c', _SECRET_HOLDER, _ENVIRON_PROBE],
        env=dict(os.environ, CALM_SANDBOX_SECRET=secret), cwd=_CHECKOUT,
        capture_output=True, text=True, timeout=60, check=False)
    self.assertEqual(caller.returncode, 0, caller.stderr)
    report = json.loads(caller.stdout)
    # The control: unsandboxed, the probe reads it in its parent's environ.
    plain = json.loads(report['plain']['stdout'])
    self.assertIn(report['pid'], plain['found'], report['plain']['stderr'])
    self.assertFalse(plain['own'])
    # Sandboxed, it finds it nowhere.
    self.assertTrue(report['boxed']['isolated'])
    boxed = json.loads(report['boxed']['stdout'])
    self.assertEqual(boxed['found'], [], report['boxed']['stderr'])
    self.assertFalse(boxed['own'])
    self.assertLess(boxed['pids'], 5)  # bwrap's init, python: nothing else.

  def test_not_root_and_no_capabilities(self):
    """Root in the sandbox's own user namespace kept every capability there:
    it could remount /usr read-write and write the host's /usr as root. The
    program now has no capabilities (and, run by root, is not root): the
    remount fails and /usr stays unwritten."""
    escaped = os.path.join('/usr', f'calm_sandbox_{secrets.token_hex(6)}')
    self.addCleanup(lambda: os.path.exists(escaped) and os.remove(escaped))
    result = self._run(
        'import os, subprocess\n'
        'status = dict(line.split(":", 1) for line in\n'
        '              open("/proc/self/status").read().splitlines())\n'
        'print(os.getuid(), status["CapEff"].strip(),\n'
        '      status["CapPrm"].strip(), flush=True)\n'
        'try:\n'
        '  subprocess.run(["mount", "-o", "remount,bind,rw", "/usr"],\n'
        '                 capture_output=True)\n'
        'except OSError:\n'
        '  pass\n'
        f'open({escaped!r}, "w").write("x")\n')
    self.assertFalse(result.passed)
    self.assertIn('Read-only file system', result.stderr)
    self.assertFalse(os.path.exists(escaped))
    uid, effective, permitted = result.stdout.split()
    self.assertEqual(int(effective, 16), 0)
    self.assertEqual(int(permitted, 16), 0)
    if os.getuid() == 0:
      self.assertNotEqual(int(uid), 0)

  def test_a_setsid_child_dies_with_the_run(self):
    marker = f'{62 + os.getpid() % 1000 / 1000:.3f}'
    result = self._run(
        'import subprocess, time\n'
        f'subprocess.Popen(["setsid", "sleep", "{marker}"])\n'
        'time.sleep(30)\n', timeout_s=1.0)
    self.assertTrue(result.timed_out)
    self.assertEqual(_sleepers(marker), [])

  def test_a_bounded_fork_bomb_is_capped(self):
    result = self._run(_FORK_BOMB, timeout_s=5.0)
    self.assertLess(int(result.stdout.split()[0]), sandbox.MAX_PROCESSES,
                    result.stdout)

  def test_a_fork_bomb_is_capped_without_a_cgroup(self):
    """Where no pids cgroup can be made (forced here), RLIMIT_NPROC caps
    the processes: run by root too, which RLIMIT_NPROC never binds, since
    the program then runs as a uid of its own."""
    with mock.patch.object(sandbox._PidsCgroup, 'BASES', ()):
      self.assertIsNone(sandbox._PidsCgroup(1).path)
      result = self._run(_FORK_BOMB, timeout_s=5.0)
    forks = int(result.stdout.split()[0])
    self.assertLess(forks, sandbox.MAX_PROCESSES, result.stdout)
    self.assertGreater(forks, 0, result.stdout)

  def test_exiting_early_or_patching_the_runner_is_a_fail(self):
    source, tests = _mean_parts()
    header = source[:source.index('    T, total, n = _sum(data)')]
    for name, body in (
        ('os._exit', header + '    return 0\nimport os\nos._exit(0)\n'),
        ('sys.exit', header + '    return 0\nimport sys\nsys.exit(0)\n'),
        ('patched runner', header + '    return 0\nimport doctest\n'
         'doctest.DocTestRunner.run = lambda self, test, *a, **k: '
         'doctest.TestResults(0, 1)\n')):
      with self.subTest(name):
        result = sandbox.run_tests(sandbox.doctest_program(
            'statistics', 'mean', body, tests))
        self.assertFalse(result.passed, result.stdout)
    # And the true body still passes the same way.
    self.assertTrue(sandbox.run_tests(sandbox.doctest_program(
        'statistics', 'mean', source, tests)).passed)


class RunUidTest(absltest.TestCase):
  """The uid a program run by root becomes must be one its user namespace
  maps (else chown and setuid fail, and so would every run)."""

  def _range(self, uid_map, gid_map):
    with mock.patch.object(sandbox, '_id_maps',
                           return_value=[uid_map, gid_map]):
      return sandbox._id_range()

  def test_initial_namespace_uses_the_high_range(self):
    full = '         0          0 4294967295\n'
    start, stop = self._range(full, full)
    self.assertEqual((start, stop), (sandbox._UID_BASE,
                                     sandbox._UID_BASE + sandbox._UID_RANGE))

  def test_rootless_container_uses_the_top_of_its_ids(self):
    # Uids 0..65535 map, gids 0..65534: both, 0..65534, whose last id
    # (65534, nobody) is left out.
    start, stop = self._range('0 1000 1\n1 100000 65535\n',
                              '0 1000 1\n1 100000 65534\n')
    self.assertEqual((start, stop), (65534 - 4096, 65534))

  def test_only_root_mapped_is_refused(self):
    with self.assertRaisesRegex(OSError, 'maps no uid but root'):
      self._range('0 1000 1\n', '0 1000 1\n')


class WithoutBubblewrapTest(absltest.TestCase):

  def test_refused_unless_unsafe(self):
    with mock.patch.object(sandbox, '_bwrap', return_value=None):
      sandbox.available.cache_clear()
      try:
        with self.assertRaisesRegex(
            ValueError, r"eval\.metrics\.doctest_eval='pass_rate' runs "
            r'model-written code.*apt-get install bubblewrap.*'
            r'eval\.sandbox\.unsafe=True'):
          sandbox.check_available(False,
                                  "eval.metrics.doctest_eval='pass_rate'")
        with self.assertRaisesRegex(ValueError, 'apt-get install bubblewrap'):
          sandbox.run_python('print(1)')
        result = sandbox.run_python('print(1)', unsafe=True)
        self.assertTrue(result.passed)
        self.assertFalse(result.isolated)
      finally:
        sandbox.available.cache_clear()

  def test_unsafe_run_by_root_without_a_cgroup_is_capped_or_refused(self):
    """An unsafe run by root, where no pids cgroup can be made, runs as a
    uid of its own (RLIMIT_NPROC never binds root) if the interpreter lets
    it; if not, nothing could limit its processes and it is refused, at
    validation (`check_available`) as at the run."""
    if os.getuid() != 0:
      self.skipTest('Only root is exempt from RLIMIT_NPROC.')
    # An interpreter that any uid may run (this one may live under /root).
    system_python = shutil.which('python3', path='/usr/bin:/usr/local/bin')
    field = "eval.metrics.doctest_eval='pass_rate'"
    with mock.patch.object(sandbox, '_bwrap', return_value=None), \
        mock.patch.object(sandbox._PidsCgroup, 'BASES', ()):
      sandbox.available.cache_clear()
      sandbox._unprivileged_python.cache_clear()
      try:
        with mock.patch.object(sandbox, '_unprivileged_python',
                               return_value=False):
          for refuse in (lambda: sandbox.check_available(True, field),
                         lambda: sandbox.run_python(_FORK_BOMB, unsafe=True)):
            with self.assertRaisesRegex(
                ValueError, r'nothing can limit the number of processes.*'
                r'apt-get install bubblewrap.*non-root user.*pids cgroup'):
              refuse()
        if system_python is None:
          self.skipTest('No system python3 to run as an unprivileged uid.')
        with mock.patch.object(sys, 'executable', system_python):
          sandbox._unprivileged_python.cache_clear()
          self.assertTrue(sandbox._unprivileged_python())
          sandbox.check_available(True, field)
          result = sandbox.run_python(_FORK_BOMB, unsafe=True, timeout_s=5.0)
      finally:
        sandbox.available.cache_clear()
        sandbox._unprivileged_python.cache_clear()
    self.assertFalse(result.isolated)
    forks = int(result.stdout.split()[0])
    self.assertLess(forks, sandbox.MAX_PROCESSES, result.stdout)
    self.assertGreater(forks, 0, result.stdout)


if __name__ == '__main__':
  absltest.main()
