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

  python -m experiments.kv_probes.bridge_writes --workdir=/tmp/calm_kv \
      --run=calm

reads `WORKDIR/config.json` and the row `WORKDIR/runs/RUN/seed_SEED` (its
composition.json and last checkpoint).
"""

import collections
import json

from absl import app
from absl import flags
import jax
import numpy as np

from calm_jax import data as data_lib
from calm_jax.data import kv_arithmetic as kv
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer
from experiments.kv_probes import workdir

_ROW = workdir.define_composed_row_flags()
_EXAMPLES = flags.DEFINE_integer('examples', 256, 'Prompts per split.')


def captured(module, method: str) -> bool:
  """What the forward records (`capture_intermediates`): each bridge's
  output, each anchor block's output and the anchor's embeddings."""
  if method == 'embed':
    return module.name == 'anchor'
  return method == '__call__' and (
      isinstance(module, transformer.Block) and module.parent.name == 'anchor'
      or isinstance(module.parent, composition_lib.Composition))


def positions_by_kind(prompt: str, keys: set[str], key_max_len: int
                      ) -> dict[str, list[int]]:
  """Input positions of a prompt's characters by kind: key (every letter of
  one), digit, operator or other. BOS shifts character c to position c + 1."""
  where, t = collections.defaultdict(list), 0
  while t < len(prompt):
    for length in range(key_max_len, 0, -1):
      if prompt[t:t + length] in keys:
        where['key'].extend(t + 1 + k for k in range(length))
        t += length
        break
    else:
      kind = 'digit' if prompt[t].isdigit() else (
          'operator' if prompt[t] in kv.ALLOWED_OPERATORS else 'other')
      where[kind].append(t + 1)
      t += 1
  return where


def main(argv):
  del argv
  task, model, params, tok = _ROW.load()
  pairs = model.augmenting[0].pairs
  keys = set(kv.make_key_map(task).as_dict())

  @jax.jit
  def intermediates(batch):
    # Causal throughout (m_A, the bridges, the anchor): the targets after
    # each prompt do not change what is measured at its positions.
    _, state = model.apply({'params': params}, batch['inputs'],
                           prompt_len=batch['prompt_len'],
                           capture_intermediates=captured,
                           mutable=['intermediates'])
    return state['intermediates']

  for split in ('kv_math_dev', 'num_math_eval'):
    examples = kv.generate_split(task, split)[:_EXAMPLES.value]
    inter = intermediates(data_lib.model_inputs(workdir.batch_of(examples,
                                                                 tok)))
    where = collections.defaultdict(list)
    for i, e in enumerate(examples):
      for kind, ts in positions_by_kind(e['prompt'], keys,
                                        task.key_max_len).items():
        where[kind].extend((i, t) for t in ts)
    # The residual each bridge adds to: the anchor's embeddings (layer -1)
    # or the output of that block in the composed model.
    anchor = inter['anchor']
    for i, j in pairs:
      bridge = inter['composition'][f'kv_{i}_{j}']
      write = np.asarray(bridge['__call__'][0])
      attention = np.asarray(bridge['attention'][0])  # [b, heads, t, s]
      residual = np.asarray(anchor['embed'][0] if j < 0 else
                            anchor[f'layer_{j}']['__call__'][0])
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
