r"""The README's reliability table, from the tests that try each case.

  python -m tests.reliability_report

Runs the test classes below (each test a case a careless user or
model-written code could bring about, which must be contained) and prints
one markdown row per area: the cases tried (tests, and the subtests inside
them) and how many held. Nothing is hand-counted: a case that fails shows
here as not held.
"""

from __future__ import annotations

import collections
import sys

import pytest

# area -> the test classes that try its cases ('file.py::Class').
AREAS = {
    'sandbox for generated code (bubblewrap)': (
        'tests/sandbox_test.py::BoundaryTest',
        'tests/sandbox_test.py::RunPythonTest',
        'tests/sandbox_test.py::DoctestProgramTest',
        'tests/sandbox_test.py::WithoutBubblewrapTest',
        'tests/evaluation_test.py::ValidateTest',
        'tests/humaneval_test.py::HumanEvalTest'),
    'one writer per directory': (
        'tests/reliability_test.py::LockTest',
        'tests/reliability_test.py::WorkdirLockTest'),
    'stale or overwritten state': (
        'tests/reliability_test.py::StaleModelTest',
        'tests/reliability_test.py::ResultsMergeTest',
        'tests/reliability_test.py::HistoryTest'),
    'bad input: one FATAL line': (
        'tests/reliability_test.py::OneLineErrorsTest',
        'tests/reliability_test.py::FlagValueTest',
        'tests/reliability_test.py::DiskErrorsTest',
        'tests/config_test.py::ValidateTest'),
}


class _Tally:
  """A pytest plugin counting each test's (and subtest's) outcome by area."""

  def __init__(self):
    self.tried = collections.Counter()
    self.held = collections.Counter()

  def _area(self, nodeid: str) -> str | None:
    for area, classes in AREAS.items():
      if any(nodeid.startswith(c + '::') for c in classes):
        return area
    return None

  def pytest_runtest_logreport(self, report):
    area = self._area(report.nodeid)
    if area is None:
      return
    # A test counts once, at its call (or at a setup that failed); each
    # subtest report is a case of its own.
    subtest = type(report).__name__ == 'SubtestReport'
    if report.when == 'call' or (report.when == 'setup' and report.failed):
      if report.skipped and not subtest:
        return
      self.tried[area] += 1
      self.held[area] += int(report.passed)


def main() -> int:
  tally = _Tally()
  args = ['-q', '-p', 'no:cacheprovider', '--no-header', '-o',
          'addopts=', *[c for cs in AREAS.values() for c in cs]]
  code = pytest.main(args, plugins=[tally])
  print('\n| area | cases tried | held |\n|---|---|---|')
  for area in AREAS:
    print(f'| {area} | {tally.tried[area]} | {tally.held[area]} |')
  return 0 if code in (0, 1) else int(code)


if __name__ == '__main__':
  sys.exit(main())
