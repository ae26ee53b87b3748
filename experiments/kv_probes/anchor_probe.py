r"""Can values written into m_B's residual stream drive its arithmetic?

CALM can only solve KV-MATH if the anchor, once a bridge has written each
key's value into its residual stream, computes the sum with its own NUM-MATH
skill. This script asks that with an oracle in place of m_A and the bridge:
after anchor block `--layer` (-1: into its embeddings) it writes a learnt
vector E[+-value] (the key's true value, signed by the operator before it)
at the last letter of every key, and a learnt F at the key's other
letters; `--mode=overwrite` replaces the residual there instead of adding
to it. Only E and F (about 2K numbers at the KV defaults) train, on
`kv_math_compose`; the anchor is frozen. The oracle is a `tasks.Task`
whose trainable tree is E and F, trained by the library's loop
(`train.run_training`, with Adam's constant learning rate).

It prints, as JSON lines:
  * `guess`: the target-token loss on `kv_math_dev` of the best guess that
    knows only the operators (the answer distribution given the operator
    string, estimated from 200K fresh expressions over the compose keys'
    values) — what a bridge that reads nothing reaches;
  * every `--eval_every` steps, the oracle's train loss (that step's batch)
    and its `kv_math_dev` loss and greedy exact match (teacher-forced
    argmax of every target token, which is what greedy decoding yields).

An exact match near CALM's target says the anchor can use values written
into it at that layer; a loss near `guess` says it cannot, whatever m_A
holds.

  python -m experiments.kv_probes.anchor_probe --workdir=/tmp/calm_kv \
      --layer=0

reads `WORKDIR/config.json` (the task) and `WORKDIR/models/anchor`.
"""

import collections
import json
import math
import re
import shutil
import tempfile

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import config_lib
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import inputs
from calm_jax.data import kv_arithmetic as kv
from calm_jax.data import pipeline
from calm_jax.models import transformer
from experiments.kv_probes import workdir

_WORKDIR = flags.DEFINE_string('workdir', '', 'A kv_arithmetic workdir.')
_CONFIG = flags.DEFINE_enum('config', 'workdir', ['workdir', 'tiny'],
                            'tiny: a random anchor on the smoke task (and '
                            'the guess from 20K expressions), for the '
                            'tests.')
_LAYER = flags.DEFINE_integer('layer', 0, 'Write after this anchor block '
                              '(-1: into its embeddings).')
_MODE = flags.DEFINE_enum('mode', 'add', ['add', 'overwrite'],
                          'Add to the residual, or replace it at key letters.')
_STEPS = flags.DEFINE_integer('steps', 400, 'Adam steps on E and F.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Examples per step.')
_LR = flags.DEFINE_float('learning_rate', 3e-2, 'Adam learning rate.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 100, 'Steps between evals.')

# Per-example arrays, aligned with the inputs, that ride along with each
# example through the pipeline (its `cached/` fields): where the oracle
# writes E (0: nowhere, else 1 + max_value + the signed value) and F.
SLOT = pipeline.CACHED + 'oracle_slot'
LETTERS = pipeline.CACHED + 'oracle_letters'


class Oracle(nn.Module):
  """The frozen anchor with learnt writes at the keys, in place of m_A and
  a bridge: E[slot] at each key's last letter, F at its other letters,
  after anchor block `layer` (-1: into the embeddings)."""
  anchor: transformer.DecoderConfig
  layer: int
  overwrite: bool
  num_slots: int

  def setup(self):
    self.anchor_lm = transformer.Decoder(self.anchor, name='anchor')
    d = self.anchor.d_model
    self.E = self.param('E', nn.initializers.zeros, (self.num_slots, d))
    self.F = self.param('F', nn.initializers.zeros, (d,))

  def write(self, x: jax.Array, slot: jax.Array, letters: jax.Array
            ) -> jax.Array:
    last = (slot > 0)[..., None].astype(x.dtype)
    other = letters[..., None].astype(x.dtype)
    if self.overwrite:
      x = x * (1 - last - other)
    return x + other * self.F + last * self.E[slot]

  def __call__(self, tokens: jax.Array, slot: jax.Array, letters: jax.Array
               ) -> jax.Array:
    """Logits; the anchor's own forward, as `Decoder` splits it, with the
    writes between two of its pieces."""
    anchor = self.anchor_lm
    positions = anchor.positions(tokens, False)
    x = anchor.embed(tokens, positions)
    for j in range(-1, self.anchor.num_layers):
      if j >= 0:
        x = anchor.block(j, x, positions)
      if j == self.layer:
        x = self.write(x, slot, letters)
    return anchor.head(x)


def oracle_task(model: Oracle, anchor: dict) -> tasks.Task:
  """The anchor frozen, E and F the only trainable tree."""
  def init_trainable(rng):
    # Under jit, XLA drops the work of initialising the (discarded) anchor.
    zeros = jnp.zeros((1, 8), jnp.int32)
    params = model.init(rng, zeros, zeros, zeros)['params']
    return {k: v for k, v in params.items() if k != 'anchor'}

  return tasks.Task(
      name='anchor_probe', model=model, frozen={'anchor': anchor},
      init_trainable=init_trainable,
      apply=lambda p, b: model.apply({'params': p}, b['inputs'], b[SLOT],
                                     b[LETTERS]))


def guess_loss(task, key_map, dev, samples: int = 200_000) -> float:
  """Dev target-token loss of p(answer token | operators, answer prefix).

  The distribution is estimated from `samples` fresh expressions over the
  compose keys' values (what D_C teaches), add-one smoothed.
  """
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
  task, arch, params, tok = workdir.load(_WORKDIR.value, 'anchor',
                                         _CONFIG.value == 'tiny')
  if not -1 <= _LAYER.value < arch.num_layers:
    raise app.UsageError(f'--layer={_LAYER.value}: the anchor has blocks '
                         f'0..{arch.num_layers - 1} (-1: its embeddings).')
  key_map = kv.make_key_map(task)
  values = key_map.as_dict()
  max_value = int(max(values.values()))
  train_ex = workdir.kv_math_examples(task, 'kv_math_compose',
                                      key_map=key_map)
  dev_ex = workdir.kv_math_examples(task, 'kv_math_dev', key_map=key_map)
  guess = guess_loss(task, key_map, dev_ex,
                     20_000 if _CONFIG.value == 'tiny' else 200_000)
  print(json.dumps({'guess': 'operators only', 'dev_loss': round(guess, 4)}),
        flush=True)

  seq_len = workdir.seq_len_of(train_ex + dev_ex, tok)

  def with_writes(example):
    """The example with where the oracle writes (SLOT, LETTERS)."""
    slot = np.zeros(seq_len, np.int32)
    letters = np.zeros(seq_len, np.float32)
    for m in re.finditer(r'[^-+*=]+', example['prompt']):  # The keys.
      # BOS shifts prompt character c to input position c + 1.
      sign = -1 if example['prompt'][max(m.start() - 1, 0)] == '-' else 1
      slot[m.end()] = sign * values[m.group()] + max_value + 1
      letters[m.start() + 1:m.end()] = 1
    return {**example, SLOT: slot, LETTERS: letters}

  train_ex = [with_writes(e) for e in train_ex]
  dev_ex = [with_writes(e) for e in dev_ex]
  mesh, rules = workdir.single_device()
  anchor = jax.device_put(params, train.decoder_shardings(arch, mesh, rules))
  model = Oracle(arch, _LAYER.value, _MODE.value == 'overwrite',
                 2 * max_value + 2)
  oracle = oracle_task(model, anchor)
  # Adam at a constant rate, as far as the library's schedule goes: one
  # warmup step, no decay, no weight decay (E and F start at zero), no
  # clipping.
  train_cfg = config_lib.train_config(
      steps=_STEPS.value, batch_size=_BATCH.value,
      learning_rate=_LR.value, warmup_steps=1, min_lr_ratio=1.0,
      weight_decay=0.0, b2=0.999, grad_clip=0.0, log_every=1,
      checkpoint_every=_EVAL_EVERY.value, keep_checkpoints=1)
  (dev,) = pipeline.eval_batches(dev_ex, tokenizer=tok, seq_len=seq_len,
                                 batch_size=len(dev_ex))
  eval_step = train.make_eval_step(oracle)
  count_exact = workdir.exact_match_fn(oracle)

  # Rows of E that some training example writes, and the norm of the
  # stream they are added to (at the keys' last letters, before writes).
  used = np.unique(np.stack([e[SLOT] for e in train_ex]))
  used = used[used > 0]

  def stream(m: transformer.Decoder, tokens: jax.Array) -> jax.Array:
    """The anchor's stream where the oracle writes, before its writes."""
    if _LAYER.value < 0:
      return m.embed(tokens, m.positions(tokens, False))
    return m.hidden_states(tokens, (_LAYER.value,))[_LAYER.value]

  before = transformer.Decoder(arch).apply(
      {'params': params}, jnp.asarray(dev['inputs']), method=stream)
  at_key = dev[SLOT] > 0
  residual_norm = float(np.linalg.norm(np.asarray(before)[at_key],
                                       axis=-1).mean())

  run_dir = tempfile.mkdtemp(prefix='kv_anchor_probe_')
  try:
    for step, trained, loss in workdir.train_in_chunks(
        oracle, train_cfg, data=inputs.TrainData(train_ex, tok, seq_len),
        run_dir=run_dir, every=_EVAL_EVERY.value, mesh=mesh, rules=rules):
      ev = train.evaluate_loss(eval_step, trained, [dev], mesh)
      print(json.dumps({
          'layer': _LAYER.value, 'mode': _MODE.value, 'step': step,
          'train_loss': round(float(loss), 4),
          'dev_loss': round(ev['loss'], 4),
          'dev_exact_match': round(
              workdir.exact_match(count_exact, trained, [dev], mesh), 4),
          # How large the oracle's writes are, beside the residual they
          # land on (bridge_writes.py measures the same for CALM).
          'key_write_norm': round(float(np.linalg.norm(
              np.asarray(trained['E'])[used], axis=-1).mean()), 3),
          'key_residual_norm': round(residual_norm, 3)}), flush=True)
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
