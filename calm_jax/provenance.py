"""What produced a workdir: the command, the code's git revision, the machine.

`train_and_evaluate` writes `WORKDIR/run.json` with `run_info()`, so that a
results table can always be traced to the command and the code that made it
(`results/make.py` prints both next to the table).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_revision() -> str:
  """HEAD of the checkout calm_jax runs from, '+dirty' if it has changes;
  '' outside a git checkout."""
  def git(*args):
    return subprocess.run(['git', '-C', _ROOT, *args], capture_output=True,
                          text=True, check=False, timeout=10)
  try:
    head = git('rev-parse', 'HEAD')
    if head.returncode:
      return ''
    dirty = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''
  return head.stdout.strip() + ('+dirty' if dirty else '')


def diff_digest() -> str:
  """sha256 (12 hex digits) of the checkout's uncommitted changes to
  tracked files, '' when there are none or outside a git checkout: runs
  that read the same `git` and `diff` ran the same code."""
  try:
    diff = subprocess.run(['git', '-C', _ROOT, 'diff', 'HEAD'],
                          capture_output=True, check=False, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return ''
  if diff.returncode or not diff.stdout:
    return ''
  return hashlib.sha256(diff.stdout).hexdigest()[:12]


def run_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      'command': shlex.join([os.path.basename(sys.executable), '-m',
                             'calm_jax.main', *sys.argv[1:]])
                 if sys.argv and sys.argv[0].endswith('main.py')
                 else shlex.join(sys.argv),
      'git': git_revision(),
      'diff': diff_digest(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'jax': jax.__version__,
      'devices': f'{len(devices)} x {devices[0].device_kind}',
      'processes': jax.process_count(),
      'cpu_count': os.cpu_count(),
  }


def code_versions(logs_dir: str, names: list[str]) -> dict[str, str]:
  """The code each named run ran, `git` revision and `/diff` digest, from
  its `<name>.run.json` in `logs_dir` (runs without one are left out).

  launch/local.py's runs each import the checkout as they start, so an
  edit made while a table runs reaches the runs that start after it.
  """
  out = {}
  for name in names:
    path = os.path.join(logs_dir, f'{name}.run.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      info = json.load(f)
    out[name] = info.get('git', '') + (
        f"/{info['diff']}" if info.get('diff') else '')
  return out
