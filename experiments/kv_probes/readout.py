r"""Does m_A carry each key's value where CALM can read it? A linear probe.

CALM can only solve KV-MATH on held-out keys if m_A's hidden states hold each
key's value in a form that one map, learnt on the compose keys of D_C, reads
on keys it never saw. This script measures exactly that, per m_A layer:

  1. run m_A over KV-MATH prompts and take its hidden state (the residual
     stream after the layer) at the last letter of every key;
  2. fit a ridge-regression one-hot readout of the key's value on the
     states of compose-key occurrences (`kv_math_compose`);
  3. report its accuracy there and on held-out-key occurrences
     (`kv_math_eval`).

A held-out accuracy near 1 says the value is linearly present and shared
across keys; near 1 / (number of values) says it is not there to read.

  python -m experiments.kv_probes.readout --workdir=/tmp/calm_kv

reads `WORKDIR/config.json` (the task) and `WORKDIR/models/aug_kv` (m_A, as
pretrained by `calm_jax.main`). Prints one JSON line per layer.
"""

import json
import re

from absl import app
from absl import flags
import jax
import numpy as np

from calm_jax.data import kv_arithmetic as kv
from calm_jax.models import transformer
from experiments.kv_probes import workdir

_WORKDIR = flags.DEFINE_string('workdir', '', 'A kv_arithmetic workdir.')
_ROLE = flags.DEFINE_string('role', 'aug_kv', 'Model directory under '
                            'WORKDIR/models (e.g. vanilla_kv, anchor).')
_CONFIG = flags.DEFINE_enum('config', 'workdir', ['workdir', 'tiny'],
                            'tiny: a random model on the smoke task, for '
                            'the tests.')
_EXAMPLES = flags.DEFINE_integer('examples', 1500,
                                 'KV-MATH prompts per side (at most).')
_RIDGE = flags.DEFINE_float('ridge', 1e-2, 'L2 penalty of the readout.')


def key_ends(prompt: str) -> list[tuple[str, int]]:
  """(key, input position of its last letter) of every key of a prompt.

  Keys are what lies between operators; BOS shifts prompt character c to
  input position c + 1, so a key's last letter sits at its match's end.
  """
  return [(m.group(), m.end()) for m in re.finditer(r'[^-+*=]+', prompt)]


def main(argv):
  del argv
  task, arch, params, tok = workdir.load(_WORKDIR.value, _ROLE.value,
                                         _CONFIG.value == 'tiny')
  model = transformer.Decoder(arch)
  values = kv.make_key_map(task).as_dict()
  layers = tuple(range(arch.num_layers))
  hidden = jax.jit(lambda tokens: model.apply(
      {'params': params}, tokens, layers,
      method=transformer.Decoder.hidden_states))

  def features(split):
    examples = workdir.kv_math_examples(task, split)[:_EXAMPLES.value]
    # Causal: the targets after each prompt do not change its states.
    batch = workdir.batch_of(examples, tok)
    states = {l: np.asarray(h) for l, h in hidden(batch['inputs']).items()}
    where, labels = [], []
    for i, e in enumerate(examples):
      for key, end in key_ends(e['prompt']):
        where.append((i, end))
        labels.append(values[key])
    idx = tuple(np.array(where).T)
    return {l: s[idx] for l, s in states.items()}, np.array(labels)

  train_x, train_y = features('kv_math_compose')
  test_x, test_y = features('kv_math_eval')
  classes = np.unique(np.concatenate([train_y, test_y]))
  onehot = (train_y[:, None] == classes[None]).astype(np.float64)
  for layer in layers:
    a = np.c_[train_x[layer], np.ones(len(train_y))].astype(np.float64)
    w = np.linalg.solve(a.T @ a + _RIDGE.value * np.eye(a.shape[1]),
                        a.T @ onehot)
    b = np.c_[test_x[layer], np.ones(len(test_y))].astype(np.float64)
    print(json.dumps({
        'model': _ROLE.value, 'layer': layer,
        'compose_key_acc': round(float(
            (classes[(a @ w).argmax(1)] == train_y).mean()), 4),
        'held_out_key_acc': round(float(
            (classes[(b @ w).argmax(1)] == test_y).mean()), 4),
        'chance': round(float(1 / len(classes)), 4),
        'train_occurrences': len(train_y),
        'test_occurrences': len(test_y)}), flush=True)


if __name__ == '__main__':
  app.run(main)
