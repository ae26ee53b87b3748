"""Text metrics for evaluation rows: chrF, exact match, per-group scores.

All metrics take parallel sequences of hypothesis and reference strings (one
reference per hypothesis) and return a percentage in [0, 100]. Empty input
scores 0.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sacrebleu.metrics import CHRF

Metric = Callable[[Sequence[str], Sequence[str]], float]


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]
                   ) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} '
                     'references; pass one reference per hypothesis.')


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus-level chrF (sacrebleu CHRF: char_order=6, word_order=0, beta=2).

  Character n-gram statistics are summed over the corpus before the
  F-score, as in sacrebleu's `corpus_chrf`; not a mean of sentence scores.
  """
  _check_lengths(hypotheses, references)
  if not hypotheses:
    return 0.0
  metric = CHRF(char_order=6, word_order=0, beta=2)
  return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]
                ) -> float:
  """Percentage of hypotheses equal to their reference (no normalisation)."""
  _check_lengths(hypotheses, references)
  if not hypotheses:
    return 0.0
  hits = sum(h == r for h, r in zip(hypotheses, references))
  return 100.0 * hits / len(hypotheses)


def grouped(metric: Metric, hypotheses: Sequence[str],
            references: Sequence[str], groups: Sequence[str]
            ) -> dict[str, float]:
  """`metric` per group (e.g. language) and their unweighted 'mean'.

  Returns {group: score, ..., 'mean': mean of the group scores}, groups in
  sorted order; {'mean': 0.0} for empty input. A group may not be named
  'mean'.
  """
  _check_lengths(hypotheses, references)
  if len(groups) != len(hypotheses):
    raise ValueError(f'{len(groups)} groups but {len(hypotheses)} '
                     'hypotheses; pass one group per hypothesis.')
  if 'mean' in groups:
    raise ValueError("A group is named 'mean', the key of the mean score; "
                     'rename it.')
  members: dict[str, tuple[list[str], list[str]]] = {}
  for h, r, g in zip(hypotheses, references, groups):
    hs, rs = members.setdefault(g, ([], []))
    hs.append(h)
    rs.append(r)
  scores = {g: metric(*members[g]) for g in sorted(members)}
  mean = sum(scores.values()) / len(scores) if scores else 0.0
  return {**scores, 'mean': mean}
