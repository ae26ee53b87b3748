r"""Train-step speed of CALM against full fine-tuning and LoRA of the anchor.

Prints one JSON object per mode:
  mode, step_s (median), tokens_per_s, peak_mem_mib (XLA's buffer estimate
  for the step: arguments + outputs + temporaries), rss_mib (process peak
  RSS so far), useful_gflop (analytic, see `useful_flops`), xla_gflop
  (XLA's own cost analysis), mfu (useful FLOPs / step_s / the dense matmul
  peak: the best burst of this run, float32 on CPU, bfloat16 on an
  accelerator), peak_gflops; with --dots_alone also
  dots_alone_s (the step's matmuls each timed alone, summed) and
  dot_bound_mfu (the MFU if nothing but those matmuls took time).

  python benchmarks/train_step.py --config=peer --threads=2

`peer` is the configuration calm-pytorch 0.2.2 is compared on: anchor 512
wide, 8 layers, 8 heads; augmenting 256 wide, 4 layers, 4 heads; vocabulary
256; batch 8 x 256; one composed pair (k = 4). The steps are the library's
own (train.make_train_step with AdamW), not a toy.

`1b` is the accelerator run: a ~1B-parameter anchor (2048 wide, 18 layers)
and a ~250M m_A (1024 wide, 16 layers), vocabulary 32,000, batch 8 x 1024,
random weights; `benchmarks/gpu.sh` runs it with `--frozen_dtype=bfloat16`.
On a GPU or TPU the yardstick is a bfloat16 8192^3 matmul (not float32
1024^3), and where the chip is known (`NOMINAL_BF16_TFLOPS`) the line also
gives its data-sheet peak and `mfu_nominal` against it.
`--params_only` prints the models' parameter counts and compiles nothing.
"""

import os
import statistics
import time

from absl import app
from absl import flags

# This script's directory is sys.path[0] when it runs: process.py is its
# neighbour, whatever the working directory.
import process  # pylint: disable=g-import-not-at-top

# No JAX in it: importing it pins nothing before process.setup does.
from calm_jax import profiling  # pylint: disable=g-bad-import-order

_CONFIG = flags.DEFINE_enum('config', 'peer', ['peer', 'tiny', '1b'],
                            'Model and batch sizes.')
_THREADS = flags.DEFINE_integer('threads', 2, 'CPU cores the run may use.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per mode.')
_MODES = flags.DEFINE_list('modes', ['calm', 'full_ft', 'lora'],
                           'Which train steps to time.')
_REMAT = flags.DEFINE_bool('remat', False, 'Recompute block activations in '
                           'the backward pass.')
_PAIRS = flags.DEFINE_string(
    'pairs', '', "CALM's layer pairs, 'aug_layer:anchor_layer,...' (0-based "
    "block outputs, e.g. 0:1,1:3,2:5,3:7); '' is the paper's rule (k = 4).")
_CACHE_AUG = flags.DEFINE_bool(
    'cache_augmenting', False, "CALM reads m_A's states from the batch "
    '(composition.cache_augmenting: computed once per dataset, not per step).')
_PROFILE = flags.DEFINE_string(
    'profile_dir', '', 'Also trace 3 steps of each mode with jax.profiler '
    'into this directory and print where their time goes (calm_jax/profiling.py).')
_DOTS = flags.DEFINE_bool(
    'dots_alone', False, "Also time each of the step's matmuls alone, at its "
    "own shapes (profiling.dot_inventory of the step's jaxpr): `dots_alone_s`"
    ' is their sum, `dot_bound_mfu` the MFU the step would reach if '
    'everything else were free.')
_DOT_TOP = flags.DEFINE_integer(
    'dot_top', 8, 'With --dots_alone: how many of the slowest matmul shapes '
    '`dot_top` lists.', lower_bound=0)
_DTYPE = flags.DEFINE_enum('frozen_dtype', 'float32',
                           ['float32', 'bfloat16'],
                           'Dtype of the frozen models (CALM and LoRA); with '
                           'bfloat16 the full fine-tune computes in bfloat16 '
                           'over its float32 weights (mixed precision).')
_PARAMS_ONLY = flags.DEFINE_bool(
    'params_only', False, "Print the models' parameter counts (no compile, "
    'no step) and stop.')

# Batch shapes by --config (the models: process.MODELS).
SIZES = {name: dict(models, **shape) for name, models, shape in (
    ('peer', process.MODELS['peer'], dict(batch=8, seq=256)),
    ('tiny', process.MODELS['tiny'], dict(batch=4, seq=32)),
    ('1b', process.MODELS['1b'], dict(batch=8, seq=1024)))}

# Dense bfloat16 TFLOP/s from the vendors' data sheets, by a substring of
# jax's `device_kind` (first match wins): what `mfu_nominal` divides by.
NOMINAL_BF16_TFLOPS = (
    ('H100 PCIe', 756.0), ('H100', 989.4), ('H200', 989.4), ('A100', 312.0),
    ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5', 459.0),
    ('TPU v6 lite', 918.0), ('TPU v6e', 918.0), ('TPU v4', 275.0))


def nominal_tflops(device_kind: str) -> float | None:
  for name, tflops in NOMINAL_BF16_TFLOPS:
    if name in device_kind:
      return tflops
  return None


def yardstick(platform: str):
  """(shape, dtype) of the matmul whose best rate is the run's peak: float32
  1024^3 on CPU (its fastest dtype there, also with --frozen_dtype=bfloat16);
  bfloat16 8192^3 on an accelerator, large enough to reach its tensor
  cores' rate."""
  return (1024, 'float32') if platform == 'cpu' else (8192, 'bfloat16')


def parse_pairs(text: str, aug, anchor) -> tuple[tuple[int, int], ...]:
  """--pairs as validated (aug_layer, anchor_layer) pairs."""
  from calm_jax.models import composition  # After the threads are pinned.
  if not text:
    return composition.select_pairs(aug.num_layers, anchor.num_layers, 4)
  try:
    pairs = [tuple(int(x) for x in p.split(':')) for p in text.split(',')]
  except ValueError:
    raise app.UsageError(f"--pairs={text!r}: give 'aug_layer:anchor_layer,"
                         "...', e.g. 0:1,1:3,2:5,3:7.") from None
  try:
    return composition.validate_pairs(pairs, aug.num_layers,
                                      anchor.num_layers, '--pairs')
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def decoder_flops(cfg, tokens: int, seq: int) -> dict[str, float]:
  """Forward matmul FLOPs of one decoder: per layer, and the head."""
  d, f, h = cfg.d_model, cfg.d_ff, cfg.num_heads
  kv = cfg.kv_heads * cfg.dim_per_head
  proj = 2 * tokens * (d * h * cfg.dim_per_head * 2 + d * kv * 2)
  mlp = 2 * tokens * d * f * (3 if cfg.mlp.startswith('gated') else 2)
  attn = 2 * 2 * tokens * seq * h * cfg.dim_per_head  # QK^T and AV.
  return {'layer': proj + mlp + attn, 'head': 2 * tokens * d * cfg.vocab_size}


def useful_flops(mode: str, anchor, aug, pairs, tokens: int, seq: int,
                 lora_rank: int, cached: bool = False) -> float:
  """FLOPs the step must do; a backward pass costs twice its forward when it
  makes weight gradients, once when it only carries activation gradients.
  `cached`: CALM reads m_A's states instead of running m_A."""
  a = decoder_flops(anchor, tokens, seq)
  fwd = anchor.num_layers * a['layer'] + a['head']
  if mode == 'full_ft':
    return 3 * fwd
  if mode == 'lora':
    # Activation gradients through every layer, plus the adapters' own
    # (rank-r) weight gradients and forward. The first layer's input needs
    # no gradient (nothing below it trains), nor does its keys' projection:
    # no input gradient of its query, key and value projections, no dK.
    # Adapters on the query and value kernels (lora.DEFAULT_TARGETS): x A
    # (d x r), then B (r x out), for each.
    q = anchor.num_heads * anchor.dim_per_head
    kv = anchor.kv_heads * anchor.dim_per_head
    adapters = anchor.num_layers * 2 * tokens * lora_rank * (
        (anchor.d_model + q) + (anchor.d_model + kv))
    first = 2 * tokens * anchor.d_model * (q + 2 * kv) + 2 * tokens * seq * q
    return 2 * fwd - first + 3 * adapters
  g = decoder_flops(aug, tokens, seq)
  lowest = min(j for _, j in pairs)
  aug_fwd = 0 if cached else (max(i for i, _ in pairs) + 1) * g['layer']
  above = anchor.num_layers - 1 - lowest  # Layers the backward crosses.
  bridge = len(pairs) * (2 * tokens * aug.d_model * anchor.d_model
                         + 4 * 2 * tokens * anchor.d_model ** 2
                         + 2 * 2 * tokens * seq * anchor.d_model)
  return fwd + aug_fwd + above * a['layer'] + a['head'] + 3 * bridge


def main(argv):
  del argv
  retained = process.setup(_THREADS.value)
  import dataclasses
  import json
  import resource

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from calm_jax import tasks
  from calm_jax.data import pipeline
  from calm_jax import train
  from calm_jax.models import composition
  from calm_jax.models import lora as lora_lib
  from calm_jax.models import transformer

  size = SIZES[_CONFIG.value]
  b, t, vocab = size['batch'], size['seq'], size['vocab']
  common = dict(vocab_size=vocab, max_len=t, mlp='gelu', norm='layernorm',
                position='learned', remat=_REMAT.value)
  anchor = transformer.DecoderConfig(
      d_ff=4 * size['anchor']['d_model'], **size['anchor'], **common)
  aug = transformer.DecoderConfig(
      d_ff=4 * size['aug']['d_model'], **size['aug'], **common)
  pairs = parse_pairs(_PAIRS.value, aug, anchor)
  model_params = {
      name: transformer.count_params(jax.eval_shape(
          lambda r, c=cfg: nn.meta.unbox(
              tasks.decoder_task('x', c).init_trainable(r)),
          jax.random.key(0)))
      for name, cfg in (('anchor_params', anchor), ('aug_params', aug))}
  if _PARAMS_ONLY.value:
    print(json.dumps({'config': _CONFIG.value, **model_params,
                      'pairs': [list(p) for p in pairs]}), flush=True)
    return
  train_cfg = ml_collections.ConfigDict(dict(
      steps=1000, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1,
      weight_decay=0.01, b1=0.9, b2=0.98, grad_clip=1.0))

  def init(arch, seed):
    task = tasks.decoder_task('x', arch)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_trainable(r)))(
        jax.random.key(seed))
    return train.cast_frozen(arch, params, _DTYPE.value)

  anchor_f, anchor_params = init(anchor, 0)
  aug_f, aug_params = init(aug, 1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  batch = {'inputs': jnp.asarray(tokens[:, :-1]),
           'targets': jnp.asarray(tokens[:, 1:]),
           'weights': jnp.ones((b, t), jnp.float32),
           'prompt_len': jnp.full((b,), t // 2, jnp.int32)}

  def calm_task():
    return tasks.composition_task(
        {'anchor': anchor_params, 'aug_x': aug_params}, anchor_f,
        (composition.Augmenting('x', aug_f, pairs),),
        bridge=composition.BridgeConfig())

  calm_size = transformer.count_params(jax.eval_shape(
      calm_task().init_trainable, jax.random.key(0)))
  lora_rank = lora_lib.rank_for_budget(anchor_params, calm_size)

  def make(mode):
    if mode == 'calm':
      return calm_task()
    if mode == 'full_ft':
      # Mixed precision when the frozen models compute in bfloat16: the
      # same compute dtype, float32 weights and optimizer.
      return tasks.decoder_task('full_ft', dataclasses.replace(
          anchor, dtype=_DTYPE.value))
    return tasks.lora_task(anchor_f, anchor_params, lora_rank,
                           lora_lib.DEFAULT_TARGETS)

  device = jax.devices()[0]
  n, peak_dtype = yardstick(device.platform)
  square = jax.random.normal(jax.random.key(0), (n, n), peak_dtype)
  matmul = jax.jit(lambda a: a @ a)
  peak = MatmulPeak(lambda: matmul(square).block_until_ready(), 2 * n ** 3)
  nominal = nominal_tflops(device.device_kind)
  step_batch = batch
  if _CACHE_AUG.value:
    # What composition.cache_augmenting reads from disk: m_A's states at the
    # paired layers, computed once per dataset, so not in the timed step.
    model = calm_task().model
    states = jax.jit(lambda p, x: model.apply(
        {'params': p}, x, method=model.augmenting_states))(
            {'aug_x': aug_params}, batch['inputs'])
    step_batch = dict(batch, **{
        f'{pipeline.CACHED}x/{i}': v for i, v in states['x'].items()})

  for mode in _MODES.value:
    task = make(mode)
    tx, schedule = train.make_optimizer(train_cfg)
    batch = step_batch if mode == 'calm' else {
        k: v for k, v in step_batch.items()
        if not k.startswith(pipeline.CACHED)}

    def init_state(r):
      params = nn.meta.unbox(task.init_trainable(r))
      return {'params': params, 'opt': tx.init(params),
              'step': jnp.zeros((), jnp.int32)}

    state = jax.jit(init_state)(jax.random.key(0))
    step = jax.jit(train.make_train_step(task, tx, schedule),
                   donate_argnums=(0,))
    compiled = step.lower(state, task.frozen, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    for _ in range(2):  # Warm-up.
      state, metrics = step(state, task.frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = step(state, task.frozen, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      peak.burst()
    step_s = statistics.median(times)
    flops = useful_flops(mode, anchor, aug, pairs, b * t, t, lora_rank,
                         cached=_CACHE_AUG.value)
    print(json.dumps({
        'mode': mode, 'config': _CONFIG.value, 'step_s': round(step_s, 4),
        'tokens_per_s': round(b * t / step_s, 1),
        'peak_mem_mib': round((mem.argument_size_in_bytes
                               + mem.output_size_in_bytes
                               + mem.temp_size_in_bytes) / 2**20, 1),
        'rss_mib': round(resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        'useful_gflop': round(flops / 1e9, 3),
        'xla_gflop': round(float(cost.get('flops', 0.0)) / 1e9, 3),
        'mfu': round(flops / step_s / peak.flops, 4),
        'peak_gflops': round(peak.flops / 1e9, 1),
        'peak_dtype': peak_dtype,
        **({'nominal_peak_tflops': nominal,
            'mfu_nominal': round(flops / step_s / (nominal * 1e12), 4)}
           if nominal else {}),
        'trainable_params': transformer.count_params(state['params']),
        'pairs': [list(p) for p in pairs] if mode == 'calm' else None,
        'cache_augmenting': _CACHE_AUG.value and mode == 'calm',
        'frozen_dtype': _DTYPE.value, 'remat': _REMAT.value,
        'threads': _THREADS.value, 'retain_freed_memory': retained,
        'device': device.platform, 'device_kind': device.device_kind,
        **model_params,
        **(_dots_alone(jax.make_jaxpr(step)(state, task.frozen, batch),
                       flops, peak.flops) if _DOTS.value else {})}),
          flush=True)
    if _PROFILE.value:
      trace_dir = os.path.join(_PROFILE.value, mode)
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
      for _ in range(3):
        state, metrics = step(state, task.frozen, batch)
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      print(json.dumps({'mode': mode, 'op_profile': profiling.op_profile(
          trace_dir, steps=3, hlo=compiled.as_text())}), flush=True)
    del state


def _dots_alone(jaxpr, useful: float, peak: float, reps: int = 5) -> dict[str, float]:
  """The step's own matmuls, each timed alone (median of `reps`), summed.

  What the step would cost if its norms, softmax, transposes and optimizer
  were free and each dot ran as fast as it does on its own: the ceiling on
  MFU at these shapes on this machine.
  """
  total = dot_flop = 0.0
  inventory = profiling.dot_inventory(jaxpr)
  rows = []
  for signature, count in inventory.items():
    fn, operands = profiling.dot_call(signature)
    call = lambda: fn(*operands).block_until_ready()  # pylint: disable=cell-var-from-loop
    call()
    seconds = median_seconds(call, reps)
    flop = profiling.dot_flops(signature)
    total += count * seconds
    dot_flop += count * flop
    lhs, rhs, _, _, ((lc, rc), (lb, rb)), _ = signature
    rows.append((count * seconds, [
        f'{list(lhs)}x{list(rhs)} contract {list(lc)}x{list(rc)}'
        f' batch {list(lb)}x{list(rb)}', count,
        round(count * seconds * 1e3, 1), round(flop / seconds / 1e9, 1)]))
  rows.sort(key=lambda r: -r[0])
  return {'dots': sum(inventory.values()), 'dot_shapes': len(inventory),
          'dot_gflop': round(dot_flop / 1e9, 3),
          'dots_alone_s': round(total, 4),
          'dots_alone_gflops': round(dot_flop / total / 1e9, 1),
          'dot_bound_mfu': round(useful / total / peak, 4),
          # [shapes, times per step, ms per step, GFLOP/s], slowest first.
          'dot_top': [r for _, r in rows[:_DOT_TOP.value]]}


def median_seconds(call, reps: int) -> float:
  """Median wall time of `reps` calls of `call` (which waits for its result)."""
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class MatmulPeak:
  """Dense matmul FLOP/s on this machine, in this run (`yardstick`'s matmul).

  Measured in bursts (median of each): six at the start and one after every
  timed step, so a slow spell of a shared machine (other tenants' load comes
  and goes over seconds) cannot set the peak alone. `flops` is the best
  burst so far: the rate the machine sustained, the same rule versus_peer.py
  applies across both frameworks' runs. `matmul` runs one product and waits
  for it (peer_calm_pytorch.py passes torch's, so both frameworks measure
  their yardstick alike).
  """

  def __init__(self, matmul, flop: int):
    self._matmul, self._flop = matmul, flop
    matmul()  # Compile, or warm up.
    self.bursts: list[float] = []
    for _ in range(6):
      self.burst()

  def burst(self, reps: int = 5) -> None:
    self.bursts.append(self._flop / median_seconds(self._matmul, reps))

  @property
  def flops(self) -> float:
    return max(self.bursts)


if __name__ == '__main__':
  app.run(main)
