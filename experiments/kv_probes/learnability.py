r"""How fast does a decoder learn one key-value arithmetic task? A probe.

Trains one `transformer.Decoder` from scratch on one task of the key-value
arithmetic data (NUM-MATH by default: what the anchor m_B must learn before
any composition can work) and prints a JSON line at every eval point:

  step, loss (of that step's batch), exact_match (% of eval examples whose
  every target token is the argmax under teacher forcing — the same as
  greedy-decoding exact match), token_acc, eval_loss, elapsed_s, plus the
  task and model sizes.

  python -m experiments.kv_probes.learnability --task=num_math \
      --max_value=100 --operators=+- --steps=3000

This is the measurement behind the README's account of why the CPU-scale
Table 1 is not reached: it isolates the anchor's arithmetic from everything
else. Data comes from `calm_jax.data.kv_arithmetic.generate_split` (no TFDS
build) and trains with the library's pretraining: `tasks.decoder_task`,
`train.run_training` (AdamW, warmup and cosine decay) over a `TrainData` of
the generated examples, resumable in `--workdir`. `--reverse_answer` writes
numeric answers least-significant digit first (a known aid for learning
addition), to measure whether the answer order is what stands in the way.
"""

import json
import os
import re
import shutil
import tempfile
import time

from absl import app
from absl import flags

from calm_jax import config_lib
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import inputs
from calm_jax.data import kv_arithmetic as kv
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from calm_jax.models import transformer
from experiments.kv_probes import workdir

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
_WORKDIR = flags.DEFINE_string(
    'workdir', '', 'Where the run keeps its checkpoints, history.json and '
    'TensorBoard events, and resumes from; empty: a temporary directory, '
    'removed at the end.')

# The flags that define a run: a --workdir holding a run of other values
# is refused rather than resumed.
_RUN_FLAGS = (_TASK, _CONFIG, _NUM_KEYS, _MAX_VALUE, _UNIQUE, _OPERATORS,
              _MIN_OPERANDS, _MAX_OPERANDS, _REVERSE, _RUNNING, _D_MODEL,
              _LAYERS, _STEPS, _BATCH, _LR)


def reverse(example):
  """The example with its numeric answer least-significant digit first."""
  target = example['target']
  sign = '-' if target.startswith('-') else ''
  return dict(example, target=sign + target[len(sign):][::-1])


def running(example):
  """The example whose target lists the result after each operand."""
  expr = example['prompt'][:-1]  # Drop the '='.
  nums = [int(x) for x in re.findall(r'\d+', expr)]
  ops = re.findall(r'[+-]', expr)
  sums = [nums[0]]
  for op, x in zip(ops, nums[1:]):
    sums.append(sums[-1] + x if op == '+' else sums[-1] - x)
  assert str(sums[-1]) == example['target'], (example, sums)
  return dict(example, target=','.join(map(str, sums[1:])))


def check_run_dir(run_dir: str) -> None:
  """Records this run's flags in run_dir; refuses a run_dir of others."""
  record = {f.name: f.value for f in _RUN_FLAGS}
  path = os.path.join(run_dir, 'probe_flags.json')
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f)
    if held != record:
      changed = sorted(k for k in record if held.get(k) != record[k])
      raise app.UsageError(
          f'--workdir={run_dir} holds a run with other values of '
          f'{", ".join("--" + k for k in changed)}; give a fresh --workdir '
          'or the same flags to resume it.')
    return
  os.makedirs(run_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)


def main(argv):
  del argv
  # Before XLA sizes its thread pool (the first computation).
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cores[:max(1, min(_THREADS.value, len(cores)))])

  if _RUNNING.value and ('*' in _OPERATORS.value
                         or _TASK.value != 'num_math'):
    raise app.UsageError('--running_sums needs --task=num_math and '
                         '--operators without "*".')
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
  train_ex = kv.generate_split(cfg, train_split)
  eval_ex = kv.generate_split(cfg, f'{_TASK.value}_eval',
                              exclude_prompts={e['prompt'] for e in train_ex})
  if _RUNNING.value:
    train_ex, eval_ex = ([running(e) for e in train_ex],
                         [running(e) for e in eval_ex])
  if _REVERSE.value and _TASK.value != 'kv_subs':
    train_ex, eval_ex = ([reverse(e) for e in train_ex],
                         [reverse(e) for e in eval_ex])
  tok = tokenizers.ByteTokenizer()
  seq_len = workdir.seq_len_of(train_ex + eval_ex, tok)

  d = 32 if tiny else _D_MODEL.value
  arch = transformer.DecoderConfig(
      vocab_size=tok.vocab_size, d_model=d, num_layers=_LAYERS.value,
      num_heads=4, d_ff=4 * d, max_len=seq_len)
  task = tasks.decoder_task(f'learnability:{_TASK.value}', arch)
  # train_config's AdamW is the probe's own: b2 0.98, weight decay 0.01,
  # clipping at 1, 5% warmup, cosine decay to 10% of the peak.
  train_cfg = config_lib.train_config(
      steps=steps, batch_size=_BATCH.value, learning_rate=_LR.value,
      log_every=1, checkpoint_every=every, keep_checkpoints=1)
  mesh, rules = workdir.single_device()
  evals = pipeline.eval_batches(eval_ex, tokenizer=tok, seq_len=seq_len,
                                batch_size=min(len(eval_ex), 512))
  eval_step = train.make_eval_step(task)
  count_exact = workdir.exact_match_fn(task)

  run_dir = _WORKDIR.value or tempfile.mkdtemp(prefix='kv_learnability_')
  check_run_dir(run_dir)
  start = time.perf_counter()
  try:
    for step, params, loss in workdir.train_in_chunks(
        task, train_cfg, data=inputs.TrainData(train_ex, tok, seq_len),
        run_dir=run_dir, every=every, mesh=mesh, rules=rules):
      ev = train.evaluate_loss(eval_step, params, evals, mesh)
      exact = workdir.exact_match(count_exact, params, evals, mesh)
      print(json.dumps({
          'task': _TASK.value, 'operators': _OPERATORS.value,
          'max_value': _MAX_VALUE.value, 'num_keys': _NUM_KEYS.value,
          'unique_values': _UNIQUE.value,
          'operands': f'{_MIN_OPERANDS.value}-{_MAX_OPERANDS.value}',
          'd_model': d, 'num_layers': _LAYERS.value,
          'reverse_answer': _REVERSE.value, 'running_sums': _RUNNING.value,
          'params': transformer.count_params(params), 'seq_len': seq_len,
          'eval_examples': len(eval_ex), 'step': step,
          'loss': round(float(loss), 4),
          'exact_match': round(100.0 * exact, 2),
          'token_acc': round(ev['accuracy'], 4),
          'eval_loss': round(ev['loss'], 4),
          'elapsed_s': round(time.perf_counter() - start, 1)}), flush=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
