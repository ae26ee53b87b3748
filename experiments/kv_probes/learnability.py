r"""How fast does a decoder learn one key-value arithmetic task? A probe.

Trains one `transformer.Decoder` from scratch on one task of the key-value
arithmetic data (NUM-MATH by default: what the anchor m_B must learn before
any composition can work) and prints a JSON line at every eval point:

  step, loss (last batch), exact_match (% of eval examples whose every target
  token is the argmax under teacher forcing — the same as greedy-decoding
  exact match), token_acc, elapsed_s, plus the task and model sizes.

  python benchmarks/kv_learnability.py --task=num_math --max_value=100 \
      --operators=+- --steps=3000

This is the measurement behind the README's account of why the CPU-scale
Table 1 is not reached: it isolates the anchor's arithmetic from everything
else. Data comes from `calm_jax.data.kv_arithmetic.generate_split` (no TFDS
build), batches are sampled with numpy, the step is plain AdamW.
`--reverse_answer` writes numeric answers least-significant digit first (a
known aid for learning addition), to measure whether the answer order is
what stands in the way.
"""

import json
import os
import re
import sys
import time

from absl import app
from absl import flags

_TASK = flags.DEFINE_enum('task', 'num_math', ['num_math', 'kv_subs',
                                               'kv_math'], 'Which task.')
_CONFIG = flags.DEFINE_enum('config', 'cpu', ['cpu', 'tiny'],
                            'tiny: seconds, for the tests.')
_NUM_KEYS = flags.DEFINE_integer('num_keys', 100, 'Keys in the map.')
_MAX_VALUE = flags.DEFINE_integer('max_value', 100, 'Values in [1, this].')
_UNIQUE = flags.DEFINE_bool(
    'unique_values', True, 'Distinct values per key (the paper); '
    '--nounique_values lets keys share values in [1, max_value].')
_OPERATORS = flags.DEFINE_string('operators', '+-*', 'Subset of "+-*".')
_MIN_OPERANDS = flags.DEFINE_integer('min_operands', 3, 'Operands, at least.')
_MAX_OPERANDS = flags.DEFINE_integer('max_operands', 6, 'Operands, at most.')
_REVERSE = flags.DEFINE_bool('reverse_answer', False,
                             'Numeric answers least-significant digit first.')
_RUNNING = flags.DEFINE_bool(
    'running_sums', False, 'Targets list the running result after each '
    'operand, comma-separated (a scratchpad); needs operators without "*".')
_D_MODEL = flags.DEFINE_integer('d_model', 96, 'Width.')
_LAYERS = flags.DEFINE_integer('num_layers', 4, 'Depth.')
_STEPS = flags.DEFINE_integer('steps', 3000, 'Optimizer steps.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_LR = flags.DEFINE_float('learning_rate', 3e-3, 'Peak AdamW learning rate.')
_EVERY = flags.DEFINE_integer('eval_every', 500, 'Steps between evals.')
_THREADS = flags.DEFINE_integer('threads', 2, 'CPU cores the run may use.')


def main(argv):
  del argv
  os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=true '
                        f'intra_op_parallelism_threads={_THREADS.value}')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from calm_jax.data import kv_arithmetic as kv
  from calm_jax.data import pipeline
  from calm_jax.data import tokenizers
  from calm_jax.models import transformer

  tiny = _CONFIG.value == 'tiny'
  steps = 4 if tiny else _STEPS.value
  every = 2 if tiny else _EVERY.value
  num_train = 512 if tiny else 100_000
  cfg = kv.make_config(
      num_keys=_NUM_KEYS.value, max_value=_MAX_VALUE.value,
      unique_values=_UNIQUE.value,
      operators=_OPERATORS.value, min_operands=_MIN_OPERANDS.value,
      max_operands=_MAX_OPERANDS.value, num_kv_subs_train=num_train,
      num_num_math_train=num_train, num_kv_math_compose=num_train,
      num_eval=64 if tiny else 512)
  train_split = {'num_math': 'num_math_train', 'kv_subs': 'kv_subs_train',
                 'kv_math': 'kv_math_compose'}[_TASK.value]
  train = kv.generate_split(cfg, train_split)
  evals = kv.generate_split(cfg, f'{_TASK.value}_eval',
                            exclude_prompts={e['prompt'] for e in train})

  def reverse(example):
    target = example['target']
    sign = '-' if target.startswith('-') else ''
    return dict(example, target=sign + target[len(sign):][::-1])

  def running(example):
    expr = example['prompt'][:-1]  # Drop the '='.
    nums = [int(x) for x in re.findall(r'\d+', expr)]
    ops = re.findall(r'[+-]', expr)
    sums = [nums[0]]
    for op, x in zip(ops, nums[1:]):
      sums.append(sums[-1] + x if op == '+' else sums[-1] - x)
    assert str(sums[-1]) == example['target'], (example, sums)
    return dict(example, target=','.join(map(str, sums[1:])))

  if _RUNNING.value:
    if '*' in _OPERATORS.value or _TASK.value != 'num_math':
      raise app.UsageError('--running_sums needs --task=num_math and '
                           '--operators without "*".')
    train, evals = [running(e) for e in train], [running(e) for e in evals]
  if _REVERSE.value and _TASK.value != 'kv_subs':
    train, evals = [reverse(e) for e in train], [reverse(e) for e in evals]
  tok = tokenizers.ByteTokenizer()
  seq_len = max(len(e['prompt']) + len(e['target']) for e in train + evals) + 1

  def encode(examples):
    rows = [pipeline.encode_example(e, tok, seq_len) for e in examples]
    return {k: np.stack([r[k] for r in rows])
            for k in ('inputs', 'targets', 'weights')}

  train_arr, eval_arr = encode(train), encode(evals)
  d = 32 if tiny else _D_MODEL.value
  arch = transformer.DecoderConfig(
      vocab_size=tok.vocab_size, d_model=d, num_layers=_LAYERS.value,
      num_heads=4, d_ff=4 * d, max_len=seq_len)
  model = transformer.Decoder(arch)
  params = nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))['params'])
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, _LR.value, max(1, steps // 20), steps, _LR.value * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b2=0.98, weight_decay=0.01))
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({'params': p}, batch['inputs'])
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['targets'])
    return (nll * batch['weights']).sum() / batch['weights'].sum()

  @jax.jit
  def step(p, o, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  @jax.jit
  def score(p, batch):
    hit = model.apply({'params': p}, batch['inputs']).argmax(-1) == batch[
        'targets']
    w = batch['weights']
    exact = (hit | (w == 0)).all(-1).mean()
    return 100.0 * exact, (hit * w).sum() / w.sum()

  params_count = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(1, steps + 1):
    idx = rng.integers(0, len(train), _BATCH.value)
    params, opt_state, loss = step(params, opt_state,
                                   {k: v[idx] for k, v in train_arr.items()})
    if i % every == 0 or i == steps:
      exact, token_acc = score(params, eval_arr)
      print(json.dumps({
          'task': _TASK.value, 'operators': _OPERATORS.value,
          'max_value': _MAX_VALUE.value, 'num_keys': _NUM_KEYS.value,
          'unique_values': _UNIQUE.value,
          'operands': f'{_MIN_OPERANDS.value}-{_MAX_OPERANDS.value}',
          'd_model': d, 'num_layers': _LAYERS.value, 'reverse_answer': _REVERSE.value,
          'running_sums': _RUNNING.value,
          'params': int(params_count), 'seq_len': seq_len, 'step': i,
          'loss': round(float(loss), 4),
          'exact_match': round(float(exact), 2),
          'token_acc': round(float(token_acc), 4),
          'elapsed_s': round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == '__main__':
  app.run(main)
