r"""How often a key-value model that ignores the keys is right on KV-MATH.

  python docs/research/kv_chance.py [--key_sets=0,1,2] [--variant=default]

For each key set (`data.kv.seed`) of experiments/kv_arithmetic.py, prints
the share of the held-out KV-MATH eval examples (the first 128, which the
table scores, and all of them) whose answer is the most common answer of
D_C's KV-MATH examples, and the share of the eval split's own most common
answer. A model that has no way to know a held-out key's value (m_B alone,
LoRA, CALM over a random m_A) can reach these by answering a likely sum.
"""

import collections
import importlib.util
import os

from absl import app
from absl import flags

_KEY_SETS = flags.DEFINE_list('key_sets', ['0', '1', '2'],
                              'data.kv.seed values.')
_VARIANT = flags.DEFINE_string('variant', 'default',
                               'Variant of experiments/kv_arithmetic.py.')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def main(argv):
  del argv
  from calm_jax.data import kv_arithmetic as K  # After flags: no JAX yet.
  spec = importlib.util.spec_from_file_location(
      'kv', os.path.join(ROOT, 'experiments', 'kv_arithmetic.py'))
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  config = exp.get_config(_VARIANT.value)
  scored = config.eval.num_examples
  print(f'| key set | D_C\'s most common KV-MATH answer | right on the first '
        f'{scored} eval examples | right on all | eval\'s own most common '
        'answer, share of all |')
  print('|---|---|---|---|---|')
  for seed in map(int, _KEY_SETS.value):
    fields = dict(config.data.kv.to_dict(), seed=seed)
    fields.pop('num_math_in_compose', None)
    cfg = K.make_config(**fields)
    key_map = K.make_key_map(cfg)
    compose = collections.Counter(
        e['target'] for e in K.generate_split(cfg, 'kv_math_compose',
                                              key_map=key_map))
    guess = compose.most_common(1)[0][0]
    evals = [e['target'] for e in K.generate_split(cfg, 'kv_math_eval',
                                                   key_map=key_map)]
    own, own_n = collections.Counter(evals).most_common(1)[0]
    pct = lambda xs: 100.0 * sum(t == guess for t in xs) / len(xs)
    print(f'| {seed} | {guess} | {pct(evals[:scored]):.1f}% | '
          f'{pct(evals):.1f}% | {own}: {100.0 * own_n / len(evals):.1f}% |')


if __name__ == '__main__':
  app.run(main)
