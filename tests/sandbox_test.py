"""Tests for calm_jax.sandbox: limits, isolation and the doctest programs."""

import inspect
import os
import socket
import statistics
import time
from unittest import mock

from absl.testing import absltest

from calm_jax import sandbox


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
    home = os.path.expanduser('~')
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = os.path.join(checkout, 'README.md')
    self.assertTrue(os.path.exists(readme))
    for path in ('/etc/passwd', readme, os.path.join(home, '.bashrc'),
                 os.path.join(home, '.profile'), __file__):
      with self.subTest(path):
        result = self._run(f'print(open({path!r}).read()[:40])')
        self.assertFalse(result.passed)
        self.assertIn('FileNotFoundError', result.stderr)
    # The home directory and the checkout do not even list.
    result = self._run(
        'import os\n'
        f'print(sorted(os.listdir({home!r})))\n'
        f'print(os.path.exists({checkout!r}))\n')
    self.assertTrue(result.passed, result.stderr)
    listing, exists = result.stdout.splitlines()
    self.assertNotIn('.bashrc', listing)
    self.assertEqual(exists, 'False')

  def test_writes_stay_inside(self):
    name = f'calm_sandbox_escape_{os.getpid()}'
    here = os.path.dirname(os.path.abspath(__file__))
    for target in ('/tmp', '/usr', here):
      with self.subTest(target):
        path = os.path.join(target, name)
        self._run(f'open({path!r}, "w").write("x")')
        self.assertFalse(os.path.exists(path))

  def test_no_view_of_the_callers_processes(self):
    os.environ['CALM_SANDBOX_SECRET'] = 'leak-7731'
    try:
      result = self._run(
          'import os\n'
          'found = []\n'
          'for pid in os.listdir("/proc"):\n'
          '  if pid.isdigit():\n'
          '    try:\n'
          '      if b"leak-7731" in open(f"/proc/{pid}/environ",\n'
          '                               "rb").read():\n'
          '        found.append(pid)\n'
          '    except OSError:\n'
          '      pass\n'
          'print("found", found, "ppid", os.getppid())\n'
          'print(len([p for p in os.listdir("/proc") if p.isdigit()]))\n')
    finally:
      del os.environ['CALM_SANDBOX_SECRET']
    self.assertTrue(result.passed, result.stderr)
    first, count = result.stdout.splitlines()
    self.assertTrue(first.startswith('found []'), first)
    self.assertLess(int(count), 5)  # bwrap's init, python: nothing else.

  def test_a_setsid_child_dies_with_the_run(self):
    marker = f'{62 + os.getpid() % 1000 / 1000:.3f}'
    result = self._run(
        'import subprocess, time\n'
        f'subprocess.Popen(["setsid", "sleep", "{marker}"])\n'
        'time.sleep(30)\n', timeout_s=1.0)
    self.assertTrue(result.timed_out)
    self.assertEqual(_sleepers(marker), [])

  def test_a_bounded_fork_bomb_is_capped(self):
    result = self._run(
        'import os, time\n'
        'n = 0\n'
        'for _ in range(128):\n'
        '  try:\n'
        '    pid = os.fork()\n'
        '  except OSError:\n'
        '    break\n'
        '  if pid == 0:\n'
        '    time.sleep(2)\n'
        '    os._exit(0)\n'
        '  n += 1\n'
        'print(n, flush=True)\n', timeout_s=5.0)
    self.assertLess(int(result.stdout.split()[0]), sandbox.MAX_PROCESSES,
                    result.stdout)

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


if __name__ == '__main__':
  absltest.main()
