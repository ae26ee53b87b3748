r"""Memory plan of a CALM training step: bytes per device, before any run.

  python benchmarks/plan.py --anchor=gemma-7b --augmenting=gemma-2b \
      --mesh=v5e-64 --batch=256 --seq=2048 [--every_k=4] [--remat]

Models are presets (`MODELS`) or a Hugging Face config.json directory;
`--mesh` is `<chip>-<devices>` (`CHIPS` gives the memory of each), split
as `--data`, `--fsdp`, `--tensor` (-1: the rest; the default is all FSDP).
Prints one JSON line: per device, the frozen weights (in `--frozen_dtype`),
the bridges and their AdamW state (float32), the activations the backward
pass keeps, and the total against the chip's memory. Parameters are
sharded by the project's own logical-axis rules (`sharding.param_shardings`
on the real parameter shapes), so a dimension a mesh axis does not divide
is replicated here as it would be in a run.

  python benchmarks/plan.py --check

compiles the real train step at small sizes on this machine's devices and
prints, beside the plan, what XLA's `compiled.memory_analysis()` reports:
the weights and optimizer state against its argument bytes, and the
activations against its temporary bytes.

The activation estimate counts, per token and per anchor layer the backward
crosses (those above the lowest composed layer, `useful_flops`' rule):
the block's input, its normed inputs, q, k, v, the attention output and
the MLP's hidden pre- and post-activation, plus the attention
probabilities (heads x sequence); the same for each bridge (float32); the
logits; and one layer's transient activations of the forward-only models.
"""

from __future__ import annotations

import json
import math

from absl import app
from absl import flags

_ANCHOR = flags.DEFINE_string('anchor', 'gemma-7b', 'Preset or HF dir.')
_AUG = flags.DEFINE_string('augmenting', 'gemma-2b', 'Preset or HF dir.')
_MESH = flags.DEFINE_string('mesh', 'v5e-64', '<chip>-<devices>.')
_DATA = flags.DEFINE_integer('data', 1, 'Data-parallel axis (-1: rest).')
_FSDP = flags.DEFINE_integer('fsdp', -1, 'FSDP axis (-1: rest).')
_TENSOR = flags.DEFINE_integer('tensor', 1, 'Tensor-parallel axis.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch (sequences).')
_SEQ = flags.DEFINE_integer('seq', 2048, 'Tokens per sequence.')
_EVERY_K = flags.DEFINE_integer('every_k', 4, "The paper's rule.")
_DTYPE = flags.DEFINE_enum('frozen_dtype', 'bfloat16',
                           ['bfloat16', 'float32'], 'Frozen models.')
_REMAT = flags.DEFINE_bool('remat', False, 'Recompute block activations.')
_ATTENTION = flags.DEFINE_enum(
    'attention', 'auto', ['auto', 'xla', 'flash'], "The models' attention "
    "kernel: 'xla' keeps the attention probabilities for the backward pass, "
    "'flash' (splash, cuDNN) does not; 'auto' is flash on TPU and GPU chips.")
_CHECK = flags.DEFINE_bool('check', False, 'Compare with XLA at small '
                           'sizes on this machine instead.')

# Public architectures (their papers' and model cards' numbers).
MODELS = {
    'gemma-2b': dict(vocab_size=256000, d_model=2048, num_layers=18,
                     num_heads=8, num_kv_heads=1, head_dim=256, d_ff=16384,
                     mlp='gated_gelu'),
    'gemma-7b': dict(vocab_size=256000, d_model=3072, num_layers=28,
                     num_heads=16, head_dim=256, d_ff=24576,
                     mlp='gated_gelu'),
    'llama3-8b': dict(vocab_size=128256, d_model=4096, num_layers=32,
                      num_heads=32, num_kv_heads=8, d_ff=14336),
    'llama3.2-1b': dict(vocab_size=128256, d_model=2048, num_layers=16,
                        num_heads=32, num_kv_heads=8, d_ff=8192),
    'tiny': dict(vocab_size=256, d_model=64, num_layers=4, num_heads=4,
                 d_ff=256),
    'tiny-aug': dict(vocab_size=256, d_model=32, num_layers=4, num_heads=2,
                     d_ff=128),
}
# Memory per chip, GiB.
CHIPS = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32, 'a100': 80, 'h100': 80,
         'h200': 141, 'cpu': 0}
GiB = 2 ** 30


def decoder(name: str, max_len: int):
  from calm_jax import hf_import  # pylint: disable=g-import-not-at-top
  from calm_jax.models import transformer  # pylint: disable=g-import-not-at-top
  if name in MODELS:
    return transformer.DecoderConfig(max_len=max_len, **MODELS[name])
  return hf_import.read_config(name)[1]


def mesh_of(spec: str, data: int, fsdp: int, tensor: int):
  """An abstract mesh (no devices needed) of `<chip>-<n>` devices."""
  import jax  # pylint: disable=g-import-not-at-top
  chip, _, n = spec.rpartition('-')
  if chip not in CHIPS or not n.isdigit():
    raise app.UsageError(f'--mesh={spec!r}: give <chip>-<devices> with a '
                         f'chip of {sorted(CHIPS)}, e.g. v5e-64.')
  n = int(n)
  sizes = [data, fsdp, tensor]
  known = math.prod(s for s in sizes if s != -1)
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise app.UsageError(f'--data/--fsdp/--tensor {sizes} do not multiply '
                         f'to the {n} devices of --mesh={spec}.')
  return chip, jax.sharding.AbstractMesh(tuple(sizes),
                                         ('data', 'fsdp', 'tensor'))


def tree_bytes(boxed, mesh, itemsize: int | None = None) -> int:
  """Bytes per device of a boxed parameter tree under the project's rules."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from calm_jax import sharding  # pylint: disable=g-import-not-at-top
  shardings = sharding.param_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(boxed))
  return sum(math.prod(s.shard_shape(x.shape)) *
             (itemsize or x.dtype.itemsize)
             for x, s in zip(leaves, jax.tree_util.tree_leaves(shardings)))


def activation_bytes(anchor, aug, pairs, tokens: int, seq: int,
                     frozen_itemsize: int, remat: bool, mesh,
                     flash: bool = False) -> int:
  """Bytes per device the backward pass keeps (see the module docstring);
  `flash`: the models' attention keeps no probabilities (the bridges' do)."""
  probs = 0 if flash else 1
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  tp = mesh.shape['tensor']
  tok = tokens / shards
  lowest = min(j for _, j in pairs)
  crossed = anchor.num_layers - 1 - lowest
  hd = anchor.num_heads * anchor.dim_per_head
  per_layer = tok * (frozen_itemsize * (
      4 * anchor.d_model + 2 * hd + 2 * anchor.kv_heads *
      anchor.dim_per_head + 2 * anchor.d_ff / tp)
                     + probs * 4 * anchor.num_heads / tp * seq)
  if remat:  # Only each block's input is kept; one block is recomputed.
    layers = crossed * tok * frozen_itemsize * anchor.d_model + per_layer
  else:
    layers = crossed * per_layer
  bridges = len(pairs) * tok * 4 * (
      aug.d_model + 5 * anchor.d_model + anchor.num_heads / tp * seq)
  logits = 2 * tok * 4 * anchor.vocab_size / tp
  transient = max(per_layer, tok * frozen_itemsize * (
      6 * aug.d_model + 2 * aug.d_ff / tp) + probs * tok * 4 *
                  aug.num_heads / tp * seq)
  return int(layers + bridges + logits + transient)


def plan(anchor, aug, mesh, *, batch: int, seq: int, every_k: int,
         frozen_dtype: str, remat: bool, flash: bool = False) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from calm_jax import tasks  # pylint: disable=g-import-not-at-top
  from calm_jax.models import composition  # pylint: disable=g-import-not-at-top
  itemsize = 2 if frozen_dtype == 'bfloat16' else 4
  pairs = composition.select_pairs(aug.num_layers, anchor.num_layers, every_k)
  shapes = lambda arch: jax.eval_shape(
      tasks.decoder_task('m', arch).init_trainable, jax.random.key(0))
  task = tasks.composition_task(
      {}, anchor, (composition.Augmenting('aug', aug, pairs),),
      bridge=composition.BridgeConfig())
  bridges = jax.eval_shape(task.init_trainable, jax.random.key(0))
  out = {
      'frozen_weights': tree_bytes(shapes(anchor), mesh, itemsize)
                        + tree_bytes(shapes(aug), mesh, itemsize),
      'bridges': tree_bytes(bridges, mesh, 4),
  }
  out['optimizer'] = 2 * out['bridges']  # AdamW's two moments.
  out['gradients'] = out['bridges']
  out['activations'] = activation_bytes(anchor, aug, pairs, batch * seq, seq,
                                        itemsize, remat, mesh, flash)
  out['total'] = sum(out.values())
  return {'pairs': [list(p) for p in pairs],
          'gib_per_device': {k: round(v / GiB, 3) for k, v in out.items()},
          'bytes_per_device': out}


def check() -> None:
  """The plan against XLA's own accounting of the compiled step, at sizes
  this machine compiles in seconds (its devices, all on FSDP)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from calm_jax import sharding  # pylint: disable=g-import-not-at-top
  from calm_jax import tasks  # pylint: disable=g-import-not-at-top
  from calm_jax import train  # pylint: disable=g-import-not-at-top
  from calm_jax.models import composition  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  batch, seq = 4 * n, 128
  anchor, aug = decoder('tiny', seq), decoder('tiny-aug', seq)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': n, 'tensor': 1})
  predicted = plan(anchor, aug, mesh.abstract_mesh, batch=batch, seq=seq,
                   every_k=1, frozen_dtype='float32', remat=False)
  pairs = tuple(map(tuple, predicted['pairs']))
  rules = sharding.DEFAULT_RULES

  def placed(arch, seed):
    boxed = jax.eval_shape(tasks.decoder_task('m', arch).init_trainable,
                           jax.random.key(seed))
    return jax.jit(lambda r: nn.meta.unbox(
        tasks.decoder_task('m', arch).init_trainable(r)),
                   out_shardings=sharding.param_shardings(boxed, mesh, rules)
                   )(jax.random.key(seed))

  task = tasks.composition_task(
      {'anchor': placed(anchor, 0), 'aug_aug': placed(aug, 1)}, anchor,
      (composition.Augmenting('aug', aug, pairs),),
      bridge=composition.BridgeConfig())
  tx, schedule = train.make_optimizer(ml_collections.ConfigDict(dict(
      steps=10, learning_rate=1e-3, warmup_steps=1, min_lr_ratio=0.1,
      weight_decay=0.01, b1=0.9, b2=0.98, grad_clip=1.0)))
  boxed = jax.eval_shape(task.init_trainable, jax.random.key(0))
  params = jax.jit(lambda r: nn.meta.unbox(task.init_trainable(r)),
                   out_shardings=sharding.param_shardings(boxed, mesh, rules)
                   )(jax.random.key(0))
  state = {'params': params, 'opt': tx.init(params),
           'step': jnp.zeros((), jnp.int32)}
  tokens = jax.device_put(jnp.zeros((batch, seq), jnp.int32),
                          sharding.batch_sharding(mesh))
  batch_ = {'inputs': tokens, 'targets': tokens,
            'weights': jnp.ones((batch, seq), jnp.float32)}
  mem = jax.jit(train.make_train_step(task, tx, schedule)).lower(
      state, task.frozen, batch_).compile().memory_analysis()
  want = predicted['bytes_per_device']
  weights = (want['frozen_weights'] + want['bridges'] + want['optimizer'])
  print(json.dumps({
      'check': 'tiny', 'devices': n, 'batch': batch, 'seq': seq,
      'plan_weights_and_optimizer': weights,
      'xla_argument_bytes': mem.argument_size_in_bytes,
      'plan_activations_and_gradients': want['activations']
                                        + want['gradients'],
      'xla_temp_bytes': mem.temp_size_in_bytes,
      'weights_ratio': round(weights / mem.argument_size_in_bytes, 3),
      'activations_ratio': round((want['activations'] + want['gradients'])
                                 / max(mem.temp_size_in_bytes, 1), 3),
  }), flush=True)


def main(argv):
  del argv
  if _CHECK.value:
    check()
    return
  anchor = decoder(_ANCHOR.value, _SEQ.value)
  aug = decoder(_AUG.value, _SEQ.value)
  chip, mesh = mesh_of(_MESH.value, _DATA.value, _FSDP.value, _TENSOR.value)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if _BATCH.value % shards:
    raise app.UsageError(f'--batch={_BATCH.value} is not divisible by the '
                         f'{shards} data-parallel devices.')
  flash = _ATTENTION.value == 'flash' or (
      _ATTENTION.value == 'auto' and chip != 'cpu')
  result = plan(anchor, aug, mesh, batch=_BATCH.value, seq=_SEQ.value,
                every_k=_EVERY_K.value, frozen_dtype=_DTYPE.value,
                remat=_REMAT.value, flash=flash)
  total = result['gib_per_device']['total']
  print(json.dumps({
      'anchor': _ANCHOR.value, 'augmenting': _AUG.value, 'mesh': _MESH.value,
      'mesh_axes': dict(mesh.shape), 'batch': _BATCH.value, 'seq': _SEQ.value,
      'frozen_dtype': _DTYPE.value, 'remat': _REMAT.value,
      'attention': 'flash' if flash else 'xla', **result,
      'chip_gib': CHIPS[chip],
      'fits': bool(CHIPS[chip]) and total <= 0.9 * CHIPS[chip]}),
        flush=True)


if __name__ == '__main__':
  app.run(main)
