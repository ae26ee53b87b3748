r"""Can values written into m_B's residual stream drive its arithmetic?

CALM can only solve KV-MATH if the anchor, once a bridge has written each
key's value into its residual stream, computes the sum with its own NUM-MATH
skill. This script asks that with an oracle in place of m_A and the bridge:
after anchor block `--layer` (-1: into its embeddings) it writes a learnt
vector E[+-value] (the key's true value, signed by the operator before it)
at the last letter of every key, and a learnt F at the key's other
letters; `--mode=overwrite` replaces the residual there instead of adding
to it. Only E and F (about
2K numbers at the KV defaults) train, on `kv_math_compose`; the anchor is
frozen.

It prints, as JSON lines:
  * `guess`: the target-token loss on `kv_math_dev` of the best guess that
    knows only the operators (the answer distribution given the operator
    string, estimated from 200K fresh expressions over the compose keys'
    values) — what a bridge that reads nothing reaches;
  * every `--eval_every` steps, the oracle's train loss and its
    `kv_math_dev` loss and greedy exact match (teacher-forced argmax of
    every target token, which is what greedy decoding yields).

An exact match near CALM's target says the anchor can use values written
into it at that layer; a loss near `guess` says it cannot, whatever m_A
holds.

  python benchmarks/kv_anchor_probe.py --workdir=/tmp/calm_kv --layer=0

reads `WORKDIR/config.json` (the task) and `WORKDIR/models/anchor`.
"""

import collections
import json
import math
import os
import re
import sys

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', '', 'A kv_arithmetic workdir.')
_CONFIG = flags.DEFINE_enum('config', 'workdir', ['workdir', 'tiny'],
                            'tiny: a random anchor on the smoke task, for '
                            'the tests.')
_LAYER = flags.DEFINE_integer('layer', 0, 'Write after this anchor block '
                              '(-1: into its embeddings).')
_MODE = flags.DEFINE_enum('mode', 'add', ['add', 'overwrite'],
                          'Add to the residual, or replace it at key letters.')
_STEPS = flags.DEFINE_integer('steps', 400, 'Adam steps on E and F.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Examples per step.')
_LR = flags.DEFINE_float('learning_rate', 3e-2, 'Adam learning rate.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 100, 'Steps between evals.')


def guess_loss(task, key_map, dev, samples: int = 200_000) -> float:
  """Dev target-token loss of p(answer token | operators, answer prefix).

  The distribution is estimated from `samples` fresh expressions over the
  compose keys' values (what D_C teaches), add-one smoothed.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from calm_jax.data import kv_arithmetic as kv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  pool = key_map.values[key_map.compose]
  lengths, operands, operators = kv.sample_expressions(rng, len(pool),
                                                       samples, task)
  counts = collections.Counter()
  contexts = collections.Counter()
  for length, row, op_idx in zip(lengths, operands, operators):
    ops = ''.join(task.operators[o] for o in op_idx[:length - 1])
    answer = str(kv.evaluate(pool[row[:length]].tolist(), ops)) + '$'
    for i, ch in enumerate(answer):
      counts[ops, answer[:i], ch] += 1
      contexts[ops, answer[:i]] += 1
  total, n = 0.0, 0
  alphabet = 12  # Digits, '-' and the end.
  for e in dev:
    ops = re.sub(r'[^-+*]', '', e['prompt'])
    answer = e['target'] + '$'
    for i, ch in enumerate(answer):
      total -= math.log((counts[ops, answer[:i], ch] + 1)
                        / (contexts[ops, answer[:i]] + alphabet))
      n += 1
  return total / n


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from calm_jax.data import kv_arithmetic as kv
  from calm_jax.models import transformer
  import kv_workdir  # benchmarks/, the script's own folder.
  task, arch, params, tok = kv_workdir.load(_WORKDIR.value, 'anchor',
                                           _CONFIG.value == 'tiny')
  if not -1 <= _LAYER.value < arch.num_layers:
    raise app.UsageError(f'--layer={_LAYER.value}: the anchor has blocks '
                         f'0..{arch.num_layers - 1} (-1: its embeddings).')
  model = transformer.Decoder(arch)
  key_map = kv.make_key_map(task)
  values = key_map.as_dict()
  max_value = int(max(values.values()))
  train_ex = kv.generate_split(task, 'kv_math_compose', key_map=key_map)
  dev_ex = kv.generate_split(task, 'kv_math_dev', key_map=key_map)
  print(json.dumps({'guess': 'operators only',
                    'dev_loss': round(guess_loss(task, key_map, dev_ex),
                                      4)}),
        flush=True)

  width = max(len(e['prompt']) + len(e['target']) + 2
              for e in train_ex + dev_ex)

  def encode(examples):
    n = len(examples)
    tokens, targets = (np.zeros((n, width), np.int32) for _ in range(2))
    weights, letters = (np.zeros((n, width), np.float32) for _ in range(2))
    slot = np.zeros((n, width), np.int32)  # 0: none, else value + max + 1.
    for i, e in enumerate(examples):
      prompt = [tok.bos_id] + tok.encode(e['prompt'])
      seq = prompt + tok.encode(e['target']) + [tok.eos_id]
      tokens[i, :len(seq)] = seq
      targets[i, :len(seq) - 1] = seq[1:]
      weights[i, len(prompt) - 1:len(seq) - 1] = 1
      for m in re.finditer(r'[^-+*=]+', e['prompt']):  # The keys.
        # BOS shifts prompt character c to token c + 1.
        sign = -1 if e['prompt'][max(m.start() - 1, 0)] == '-' else 1
        slot[i, m.end()] = sign * values[m.group()] + max_value + 1
        letters[i, m.start() + 1:m.end()] = 1
    return tuple(map(jnp.asarray, (tokens, targets, weights, slot, letters)))

  train, dev = encode(train_ex), encode(dev_ex)

  def forward(theta, tokens, slot, letters):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    run = lambda method, *a: model.apply({'params': params}, *a,
                                         method=method)

    def write(x):
      last = (slot > 0)[..., None].astype(x.dtype)
      other = letters[..., None]
      if _MODE.value == 'overwrite':
        x = x * (1 - last - other)
      return x + other * theta['F'] + last * theta['E'][slot]

    x = run(lambda m, t, p: m.embed(t, p), tokens, positions)
    if _LAYER.value == -1:
      x = write(x)
    for j in range(arch.num_layers):
      x = run(lambda m, x, p, j=j: m.block(j, x, p), x, positions)
      if j == _LAYER.value:
        x = write(x)
    return run(lambda m, x: m.head(x), x)

  def residual_at_keys(tokens, slot):
    """Mean norm of the stream at the keys' last letters, before writes."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.apply({'params': params}, tokens, positions,
                    method=lambda m, t, p: m.embed(t, p))
    for j in range(_LAYER.value + 1):
      x = model.apply({'params': params}, x, positions,
                      method=lambda m, x, p, j=j: m.block(j, x, p))
    at_key = (slot > 0).astype(jnp.float32)
    return (jnp.linalg.norm(x, axis=-1) * at_key).sum() / at_key.sum()

  def loss_fn(theta, batch):
    tokens, targets, weights, slot, letters = batch
    logits = forward(theta, tokens, slot, letters)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    exact = ((logits.argmax(-1) == targets) | (weights == 0)).all(-1)
    return (loss * weights).sum() / weights.sum(), exact.mean()

  theta = {'E': jnp.zeros((2 * max_value + 2, arch.d_model)),
           'F': jnp.zeros((arch.d_model,))}
  opt = optax.adam(_LR.value)
  opt_state = opt.init(theta)

  @jax.jit
  def step(theta, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta, batch)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(theta, updates), opt_state, loss

  evaluate = jax.jit(loss_fn)
  # Rows of E that some training example writes, and the norm of what
  # they are added to (the residual at the key's last letter).
  used = np.unique(np.asarray(train[3])[np.asarray(train[3]) > 0])
  residual_norm = float(jax.jit(residual_at_keys)(dev[0], dev[3]))
  rng = np.random.default_rng(0)
  for s in range(1, _STEPS.value + 1):
    idx = rng.integers(0, len(train_ex), _BATCH.value)
    theta, opt_state, loss = step(theta, opt_state,
                                  tuple(a[idx] for a in train))
    if s % _EVAL_EVERY.value == 0 or s == _STEPS.value:
      dev_loss, dev_exact = evaluate(theta, dev)
      print(json.dumps({
          'layer': _LAYER.value, 'mode': _MODE.value, 'step': s,
          'train_loss': round(float(loss), 4),
          'dev_loss': round(float(dev_loss), 4),
          'dev_exact_match': round(float(dev_exact), 4),
          # How large the oracle's writes are, beside the residual they
          # land on (kv_bridge_writes.py measures the same for CALM).
          'key_write_norm': round(float(jnp.linalg.norm(
              theta['E'][used], axis=-1).mean()), 3),
          'key_residual_norm': round(residual_norm, 3)}), flush=True)


if __name__ == '__main__':
  app.run(main)
