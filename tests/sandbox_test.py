"""Tests for calm_jax.sandbox: limits, isolation and the doctest programs."""

import inspect
import os
import statistics
import time

from absl.testing import absltest

from calm_jax import sandbox


def _mean_parts() -> tuple[str, str]:
  """The true source of statistics.mean and its doctest text."""
  source = inspect.getsource(statistics.mean)
  tests = inspect.cleandoc(statistics.mean.__doc__)
  return source, tests


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
    result = sandbox.run_python(
        'import subprocess, sys\n'
        'child = subprocess.Popen(["sleep", "60"])\n'
        'print(child.pid, flush=True)\n'
        'while True:\n'
        '  pass\n', timeout_s=1.0)
    elapsed = time.monotonic() - start
    self.assertTrue(result.timed_out)
    self.assertFalse(result.passed)
    self.assertEqual(result.returncode, -9)
    self.assertLess(elapsed, 4.0)
    child = int(result.stdout.split()[0])
    # Killed too (a zombie at most, if nothing reaps orphans here).
    deadline = time.monotonic() + 2.0
    while (_process_state(child) not in (None, 'Z') and
           time.monotonic() < deadline):
      time.sleep(0.05)
    self.assertIn(_process_state(child), (None, 'Z'))

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
    workdir = result.stdout.strip()
    self.assertNotEqual(os.path.realpath(workdir),
                        os.path.realpath(os.getcwd()))
    self.assertFalse(os.path.exists(name))
    # The temporary directory is removed afterwards.
    self.assertFalse(os.path.exists(workdir))

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
    result = sandbox.run_python(
        sandbox.doctest_program('statistics', 'mean', source, tests))
    self.assertTrue(result.passed, result.stdout + result.stderr)
    self.assertRegex(result.stdout, r'doctest: (\d+)/\1 passed')

  def test_wrong_body_fails(self):
    source, tests = _mean_parts()
    header = source[:source.index('    T, total, n = _sum(data)')]
    wrong = header + '    return 0\n'
    result = sandbox.run_python(
        sandbox.doctest_program('statistics', 'mean', wrong, tests))
    self.assertFalse(result.passed)
    self.assertEqual(result.returncode, 1)
    self.assertIn('Failed example', result.stdout)

  def test_raising_body_fails(self):
    source, tests = _mean_parts()
    header = source[:source.index('    T, total, n = _sum(data)')]
    result = sandbox.run_python(sandbox.doctest_program(
        'statistics', 'mean', header + '    raise ZeroDivisionError\n', tests))
    self.assertFalse(result.passed)

  def test_other_name_or_no_examples_fail(self):
    source, tests = _mean_parts()
    # Defines `average`, so `mean` would still be the original: must fail.
    renamed = source.replace('def mean(', 'def average(', 1)
    result = sandbox.run_python(
        sandbox.doctest_program('statistics', 'mean', renamed, tests))
    self.assertFalse(result.passed)
    self.assertIn('does not define', result.stdout)
    result = sandbox.run_python(sandbox.doctest_program(
        'statistics', 'mean', source, 'Just prose, no examples.'))
    self.assertFalse(result.passed)
    self.assertIn('No doctest examples', result.stdout)

  def test_syntax_error_fails(self):
    _, tests = _mean_parts()
    result = sandbox.run_python(sandbox.doctest_program(
        'statistics', 'mean', 'def mean(data):\n  return (\n', tests))
    self.assertFalse(result.passed)
    self.assertIn('SyntaxError', result.stderr)

  def test_requires_module_and_name(self):
    with self.assertRaisesRegex(ValueError, 'module'):
      sandbox.doctest_program('', 'mean', 'def mean(): pass', '>>> 1\n1')


class PassRateTest(absltest.TestCase):

  def test_order_and_values(self):
    programs = ['pass', 'raise SystemExit(3)', 'print(1)',
                'import time\ntime.sleep(10)']
    self.assertEqual(
        sandbox.pass_rate(programs, timeout_s=1.0, max_workers=2),
        [True, False, True, False])
    self.assertEqual(sandbox.pass_rate([]), [])


if __name__ == '__main__':
  absltest.main()
