r"""How does a trained composition get KV-MATH wrong?

Exact match alone cannot tell a bridge that misreads some held-out keys
every time (it did not generalise to them) from one that delivers every
value a little imprecisely (errors that depend on the context). This script
decodes, greedily and with the composition of a kv_arithmetic workdir:

  * the first `--examples` prompts of `kv_math_eval`, and prints its exact
    match and a histogram of prediction - answer over the wrong ones
    (`non_numeric` counts answers that are not a number);
  * for each held-out key, 3-operand prompts `k o a o b=` with the key at
    each of the three places and a and b drawn from the compose keys in
    `--contexts` ways (the same draws for every key). It prints their exact
    match, how many keys are right in every context (`keys_always_right`)
    and in none (`keys_never_right`), and the exact match by the key's
    place;
  * the same prompts with a compose key in place of the held-out one
    (`probe: compose_keys`), the control: D_C's own keys.

  python -m experiments.kv_probes.errors --workdir=/tmp/calm_kv --run=calm

reads `WORKDIR/config.json` and the row `WORKDIR/runs/RUN/seed_SEED` (its
composition.json and last checkpoint).
"""

import collections
import json

from absl import app
from absl import flags
import numpy as np

from calm_jax import decoding
from calm_jax.data import kv_arithmetic as kv
from calm_jax.data import pipeline
from experiments.kv_probes import workdir

_ROW = workdir.define_composed_row_flags()
_EXAMPLES = flags.DEFINE_integer('examples', 128, 'kv_math_eval prompts.',
                                 lower_bound=1)
_CONTEXTS = flags.DEFINE_integer('contexts', 4, 'Compose-key contexts per '
                                 'key and place.', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch_size', 512, 'Prompts per decode call.',
                              lower_bound=1)


def main(argv):
  del argv
  task, model, params, tok = _ROW.load()
  key_map = kv.make_key_map(task)
  new_tokens = len(str(task.max_operands * task.max_value)) + 2

  def complete(prompts):
    """Greedy completions of `prompts`, batch by batch."""
    # Empty targets: rows as wide as the longest prompt, nothing after it.
    examples = [{'prompt': p, 'target': ''} for p in prompts]
    batches = pipeline.eval_batches(
        examples, tokenizer=tok, seq_len=workdir.seq_len_of(examples, tok),
        batch_size=min(_BATCH.value, len(examples)))
    out = []
    for b in batches:
      # The prompt alone (BOS + prompt), right-padded.
      heads = np.where(np.arange(b['inputs'].shape[1])[None]
                       < b['prompt_len'][:, None], b['inputs'], tok.pad_id)
      gen = decoding.generate(
          model, params, heads.astype(np.int32), b['prompt_len'],
          max_new_tokens=new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
          model_kwargs={'prompt_len': b['prompt_len']})
      texts = decoding.decode_texts(gen['new_tokens'], tok, gen['num_new'])
      out.extend(t for t, v in zip(texts, b['valid']) if v)
    return out

  # ---- kv_math_eval: exact match and how far off the wrong answers are.
  examples = kv.generate_split(task, 'kv_math_eval',
                               key_map=key_map)[:_EXAMPLES.value]
  predictions = complete([e['prompt'] for e in examples])
  errors = collections.Counter()
  for e, p in zip(examples, predictions):
    if p != e['target']:
      try:
        errors[str(int(p) - int(e['target']))] += 1
      except ValueError:
        errors['non_numeric'] += 1
  print(json.dumps({
      'split': 'kv_math_eval', 'examples': len(examples),
      'exact_match': round(sum(p == e['target'] for e, p in zip(
          examples, predictions)) / len(examples), 4),
      'error_histogram': dict(sorted(errors.items(), key=lambda kv_: (
          kv_[0] == 'non_numeric', int(kv_[0]) if kv_[0] != 'non_numeric'
          else 0)))}), flush=True)

  # ---- one key in fixed compose-key contexts, at each of three places.
  rng = np.random.default_rng(0)
  ops = task.operators
  contexts = [(rng.choice(key_map.compose, 2), rng.choice(list(ops), 2))
              for _ in range(_CONTEXTS.value)]
  for probe, pool in (('held_out_keys', key_map.held_out),
                      ('compose_keys', key_map.compose)):
    prompts, answers, who = [], [], []
    for k in pool:
      for place in range(3):
        for pair, (o1, o2) in contexts:
          idx = [int(x) for x in pair]
          idx.insert(place, int(k))
          prompts.append(kv.render([key_map.keys[i] for i in idx],
                                   [o1, o2]) + '=')
          answers.append(str(kv.evaluate(
              [int(key_map.values[i]) for i in idx], [o1, o2])))
          who.append((int(k), place))
    right = np.array([p == a for p, a in zip(complete(prompts), answers)])
    per_key, per_place = collections.defaultdict(list), [[], [], []]
    for (k, place), r in zip(who, right):
      per_key[k].append(r)
      per_place[place].append(r)
    key_acc = np.array([np.mean(v) for v in per_key.values()])
    print(json.dumps({
        'probe': probe, 'keys': len(per_key), 'prompts': len(prompts),
        'exact_match': round(float(right.mean()), 4),
        'keys_always_right': round(float((key_acc == 1).mean()), 4),
        'keys_never_right': round(float((key_acc == 0).mean()), 4),
        'exact_match_by_place': [round(float(np.mean(v)), 4)
                                 for v in per_place]}), flush=True)


if __name__ == '__main__':
  app.run(main)
