r"""How often a key-value model that ignores the keys is right on KV-MATH.

  python docs/research/kv_chance.py [--key_sets=0,1,2] [--variant=default]
  python docs/research/kv_chance.py --designs=9:3:6,19:3:6

For each key set (`data.kv.seed`) of experiments/kv_arithmetic.py, prints
the share of the held-out KV-MATH eval examples (the first 128, which the
table scores, and all of them) whose answer is the most common answer of
D_C's KV-MATH examples, and the share of the eval split's own most common
answer. A model that has no way to know a held-out key's value (m_B alone,
LoRA, CALM over a random m_A) can reach these by answering a likely sum.

It can do better by reading what the prompt does show: its operators.
The last two columns guess, for each eval prompt, the most likely answer
given the operators in their order (keys masked): D_C's most common
answer for that pattern (what a model trained on D_C could learn), and the
answer most likely when every key's value is drawn from the held-out keys'
values (exact for `+ -`): the best a key-blind guess can expect, whatever
it was trained on.

`--designs` prints, instead, that best key-blind score for other task
designs, exactly (by convolution): values uniform on 1..V, operand counts
uniform on [lo, hi], `+ -` uniform: what the m_B <= 5% target needs.
"""

import collections
import importlib.util
import itertools
import os
import re

import numpy as np

from absl import app
from absl import flags

_KEY_SETS = flags.DEFINE_list('key_sets', ['0', '1', '2'],
                              'data.kv.seed values.')
_VARIANT = flags.DEFINE_string('variant', 'default',
                               'Variant of experiments/kv_arithmetic.py.')
_DESIGNS = flags.DEFINE_list(
    'designs', [], 'V:lo:hi task designs (values 1..V, lo..hi operands, '
    '`+ -`) whose best key-blind exact match to print instead.')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def main(argv):
  del argv
  if _DESIGNS.value:
    print('| values | operands | best key-blind exact match |')
    print('|---|---|---|')
    for design in _DESIGNS.value:
      try:
        v, lo, hi = map(int, design.split(':'))
      except ValueError:
        raise app.UsageError(f'--designs: {design!r} is not V:lo:hi, e.g. '
                             '9:3:6 (values 1-9, 3-6 operands).') from None
      print(f'| 1-{v} | {lo}-{hi} | {design_floor(v, lo, hi):.1f}% |')
    return
  from calm_jax.data import kv_arithmetic as K  # After flags: no JAX yet.
  spec = importlib.util.spec_from_file_location(
      'kv', os.path.join(ROOT, 'experiments', 'kv_arithmetic.py'))
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  config = exp.get_config(_VARIANT.value)
  scored = config.eval.num_examples or None  # 0: the table scores all.
  first = f'the first {scored}' if scored else 'the scored (all)'
  print(f'| key set | D_C\'s most common KV-MATH answer | right on {first} '
        'eval examples | right on all | eval\'s own most common '
        'answer, share of all | D_C\'s mode per operator pattern, right on '
        'all | the most likely answer per operator pattern, right on all |')
  print('|---|---|---|---|---|---|---|')
  for seed in map(int, _KEY_SETS.value):
    fields = dict(config.data.kv.to_dict(), seed=seed)
    fields.pop('num_math_in_compose', None)
    cfg = K.make_config(**fields)
    key_map = K.make_key_map(cfg)
    compose_examples = list(K.generate_split(cfg, 'kv_math_compose',
                                             key_map=key_map))
    eval_examples = list(K.generate_split(cfg, 'kv_math_eval',
                                          key_map=key_map))
    guess = collections.Counter(
        e['target'] for e in compose_examples).most_common(1)[0][0]
    evals = [e['target'] for e in eval_examples]
    own, own_n = collections.Counter(evals).most_common(1)[0]
    pct = lambda xs: 100.0 * sum(t == guess for t in xs) / len(xs)
    pattern_pct = lambda modes: 100.0 * sum(
        modes.get(_pattern(e['prompt']), guess) == e['target']
        for e in eval_examples) / len(eval_examples)
    likely = _likely_answers(eval_examples, key_map, K.evaluate)
    print(f'| {seed} | {guess} | {pct(evals[:scored]):.1f}% | '
          f'{pct(evals):.1f}% | {own}: {100.0 * own_n / len(evals):.1f}% | '
          f'{pattern_pct(_pattern_modes(compose_examples)):.1f}% | '
          f'{pattern_pct(likely):.1f}% |')


def design_floor(max_value: int, lo: int, hi: int) -> float:
  """Best key-blind exact match, %: per operator pattern, the most likely
  answer's probability, averaged over patterns and operand counts."""
  values = collections.Counter(range(1, max_value + 1))
  total = 0.0
  for n in range(lo, hi + 1):
    patterns = list(itertools.product('+-', repeat=n - 1))
    for pattern in patterns:
      dist = _answer_counts(values, pattern)
      total += max(dist.values()) / max_value**n / len(patterns)
  return 100.0 * total / (hi - lo + 1)


def _answer_counts(values: collections.Counter, ops) -> collections.Counter:
  """How many operand draws give each answer of v0 op1 v1 op2 v2 ... with
  `+ -` only, each operand drawn from `values` (value -> count): the
  exact convolution."""
  dist = collections.Counter(values)
  for op in ops:
    sign = 1 if op == '+' else -1
    nxt = collections.Counter()
    for total, n in dist.items():
      for v, m in values.items():
        nxt[total + sign * v] += n * m
    dist = nxt
  return dist


def _pattern(prompt: str) -> str:
  """The prompt's operators in order, every key masked."""
  return re.sub(r'[^-+*=:]+', 'K', prompt)


def _likely_answers(examples, key_map, evaluate, draws: int = 20_000
                    ) -> dict[str, str]:
  """Per operator pattern, the most likely answer when each key's value is
  drawn from the held-out keys' values: exact for `+ -` (a convolution),
  over `draws` random draws with `*` (`evaluate` is the generator's own).
  Ties go to the smaller answer."""
  rng = np.random.default_rng(0)
  values = collections.Counter(
      int(v) for v in key_map.values[key_map.held_out])
  out = {}
  for pattern in sorted({_pattern(e['prompt']) for e in examples}):
    ops = [c for c in pattern if c in '+-*']
    if '*' in ops:
      operands = rng.choice(list(values.elements()),
                            size=(draws, len(ops) + 1))
      dist = collections.Counter(evaluate(row, ops) for row in operands)
    else:
      dist = _answer_counts(values, ops)
    out[pattern] = str(min(dist, key=lambda a: (-dist[a], a)))
  return out


def _pattern_modes(examples) -> dict[str, str]:
  counts = collections.defaultdict(collections.Counter)
  for e in examples:
    counts[_pattern(e['prompt'])][e['target']] += 1
  return {p: c.most_common(1)[0][0] for p, c in counts.items()}


if __name__ == '__main__':
  app.run(main)
