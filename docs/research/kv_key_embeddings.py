r"""A copy of a key-value anchor with its embeddings of the keys replaced.

  python docs/research/kv_key_embeddings.py --anchor=W/models/anchor \
      --out=DIR [--mode=zero|mean] [--num_keys=500]

The anchor of experiments/kv_arithmetic.py never reads a key in its
pretraining, so its embedding rows of the keys stay at their random init
(norm ~4, against ~1.5 for the value tokens and digits it trained): per-key
noise that the bridges, writing into the embeddings, must overcome on keys
they never trained on. This writes a model directory equal to the anchor
but with those rows zero (`zero`) or all their mean (`mean`), to pass as
`--config.models.anchor.checkpoint=DIR`: whether the noise is what limits
CALM (docs/research/kv_arithmetic.md, *An anchor told the values*). The
keys are the one-character keys of the variant (`kv_arithmetic.letters`);
the char tokenizer's id of a character is its code point + 3.
"""

from absl import app
from absl import flags
import jax
import numpy as np

from calm_jax import checkpoints
from calm_jax.data import kv_arithmetic
from calm_jax.data import tokenizers

_ANCHOR = flags.DEFINE_string('anchor', None, 'The anchor model directory.',
                              required=True)
_OUT = flags.DEFINE_string('out', None, 'Where to write the copy.',
                           required=True)
_MODE = flags.DEFINE_enum('mode', 'zero', ['zero', 'mean'],
                          'What the key rows become.')
_NUM_KEYS = flags.DEFINE_integer('num_keys', 500, 'data.kv.num_keys.')


def main(argv):
  del argv
  config, params = checkpoints.load_model(_ANCHOR.value, field='--anchor')
  meta = checkpoints.read_model_json(_ANCHOR.value)
  offset = tokenizers.CharTokenizer.num_special
  ids = np.array([ord(c) + offset
                  for c in kv_arithmetic.letters(_NUM_KEYS.value)])
  params = jax.tree_util.tree_map(np.array, params)
  table = params['embedding']
  norms = lambda rows: float(np.linalg.norm(rows, axis=1).mean())
  print(f'key rows: mean norm {norms(table[ids]):.2f} over {len(ids)} keys')
  table[ids] = 0.0 if _MODE.value == 'zero' else table[ids].mean(0)
  extra = {k: v for k, v in meta.items() if k not in ('format', 'arch', 'uid')}
  checkpoints.save_model(_OUT.value, config, params, **extra)
  print(f'wrote {_OUT.value} (key rows: {_MODE.value})')


if __name__ == '__main__':
  app.run(main)
