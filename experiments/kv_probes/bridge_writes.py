r"""How much does a trained composition write into the anchor, and where?

The bridges add f_cross(f_proj(H_A), H_B) to the anchor's residual stream
at every position. The anchor normalises each block's input (RMSNorm), so
a write much larger than the residual it lands on replaces what the anchor
computed there rather than adding to it. This script runs a trained
composition of a kv_arithmetic workdir over prompts of `kv_math_dev`
(held-out keys) and `num_math_eval` (numerals only, m_B's own skill) and
prints, per bridge and per kind of prompt position (key, operator, digit),
one JSON line with

  * `write_norm`: the mean L2 norm of the bridge's output there;
  * `residual_norm`: the mean norm of the anchor residual it is added to
    (the embeddings for anchor layer -1, else the output of that block in
    the composed model);
  * `own_attention`: per head, the mean attention weight on m_A's state
    at the position itself (the rest reads other positions).

  python benchmarks/kv_bridge_writes.py --workdir=/tmp/calm_kv --run=calm

reads `WORKDIR/config.json`, `WORKDIR/models/{anchor,aug_kv}` and the last
checkpoint of `WORKDIR/runs/RUN/seed_SEED`.
"""

import collections
import json
import os
import sys

from absl import app
from absl import flags
import kv_workdir  # benchmarks/, the script's own folder (sys.path[0]).

_ROW = kv_workdir.define_composed_row_flags()
_EXAMPLES = flags.DEFINE_integer('examples', 256, 'Prompts per split.')


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from calm_jax.data import kv_arithmetic as kv
  from calm_jax.models import transformer

  task, model, params, tok = _ROW.load()
  anchor_cfg, pairs = model.anchor, model.augmenting[0].pairs
  anchor = params['anchor']
  keys = set(kv.make_key_map(task).as_dict())

  @jax.jit
  def intermediates(tokens):
    _, state = model.apply({'params': params}, tokens,
                           capture_intermediates=True,
                           mutable=['intermediates'])
    return state['intermediates']

  for split in ('kv_math_dev', 'num_math_eval'):
    examples = kv.generate_split(task, split)[:_EXAMPLES.value]
    rows = [[tok.bos_id] + tok.encode(e['prompt']) for e in examples]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    inter = intermediates(jnp.asarray(tokens))
    # Position kinds by the prompt's text; keys may be several characters,
    # each of which counts as a key position.
    where = collections.defaultdict(list)
    for i, e in enumerate(examples):
      prompt, t = e['prompt'], 0
      while t < len(prompt):
        for length in range(task.key_max_len, 0, -1):
          if prompt[t:t + length] in keys:
            where['key'].extend((i, t + 1 + k) for k in range(length))
            t += length
            break
        else:
          kind = 'digit' if prompt[t].isdigit() else (
              'operator' if prompt[t] in kv.ALLOWED_OPERATORS else 'other')
          where[kind].append((i, t + 1))  # +1: BOS.
          t += 1
    # The anchor's own input: embeddings as its config scales them.
    embedded = np.asarray(transformer.Decoder(anchor_cfg).apply(
        {'params': anchor}, jnp.asarray(tokens),
        jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
        method=transformer.Decoder.embed))
    for i, j in pairs:
      bridge = inter['composition'][f'kv_{i}_{j}']
      write = np.asarray(bridge['__call__'][0])
      attention = np.asarray(bridge['attention'][0])  # [b, heads, t, s]
      residual = (embedded if j < 0 else np.asarray(
          inter['anchor'][f'layer_{j}']['__call__'][0]))
      for kind in ('key', 'operator', 'digit'):
        if not where[kind]:
          continue
        b, t = np.array(where[kind]).T
        print(json.dumps({
            'split': split, 'bridge': [i, j], 'position': kind,
            'count': len(b),
            'write_norm': round(float(
                np.linalg.norm(write[b, t], axis=-1).mean()), 3),
            'residual_norm': round(float(
                np.linalg.norm(residual[b, t], axis=-1).mean()), 3),
            'own_attention': [round(float(a), 3)
                              for a in attention[b, :, t, t].mean(0)]}),
              flush=True)


if __name__ == '__main__':
  app.run(main)
