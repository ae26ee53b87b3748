"""Device mesh, logical-axis rules and shardings for params and batches.

One mesh with axes ('data', 'fsdp', 'tensor'), as in MaxText:
  - data:   pure data parallelism (params replicated, batch split);
  - fsdp:   batch split *and* params split along 'embed' (ZeRO-3 style);
  - tensor: params split along heads / mlp / vocab (Megatron style).

Every model parameter carries logical axis names
(`nn.with_logical_partitioning`); the rules below map them to mesh axes, so
the same model code runs on one CPU or a pod. The flow, big_vision style
(shapes first, no host copy of params):

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh.rules)
    abstract = jax.eval_shape(model.init, rng, tokens)         # boxed shapes
    shardings = sharding.param_shardings(abstract, mesh, rules)  # plain tree
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)),
                     out_shardings=shardings)(rng)
    local = sharding.check_batch_size(config.train.batch_size, mesh)
    batch = sharding.global_batch(next(local_iterator), mesh)  # local rows
    eval_batch = sharding.global_batch(same_on_all_hosts, mesh, whole=True)

A dimension that a mesh axis does not divide (4 heads on an 8-way tensor
axis) is replicated instead of failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import functools
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

MESH_AXES = ('data', 'fsdp', 'tensor')
# The batch dimension is split over every data-parallel axis.
BATCH_AXES = ('data', 'fsdp')

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Flax/MaxText-style (logical name, mesh axes) pairs, in priority order.
DEFAULT_RULES: Rules = (
    ('batch', BATCH_AXES),  # Activations, should a model constrain them.
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    # The augmenting width inside a bridge projection: small, and its 'embed'
    # partner already takes 'fsdp'.
    ('aug_embed', None),
)


# --------------------------------------------------------------------------
# Mesh.


def make_mesh(mesh_shape: Mapping[str, Any],
              devices: Sequence[Any] | None = None,
              field: str = 'mesh') -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all).

  `mesh_shape` maps axis names to sizes (a missing axis is 1); one size may
  be -1, meaning all remaining devices. Keys that are not axes are ignored
  unless their value is an int, which is most likely a misspelt axis.
  Devices are laid out by `jax.make_mesh` (topology-aware; 'tensor' varies
  fastest, so it stays within a host). Multi-slice (DCN) meshes are not
  supported yet.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for key, value in mesh_shape.items():
    if key not in MESH_AXES and isinstance(value, int):
      raise ValueError(f'{field}.{key}={value}: unknown mesh axis; the axes '
                       f'are {list(MESH_AXES)}.')
  sizes = {}
  for axis in MESH_AXES:
    size = mesh_shape.get(axis, 1)
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f'{field}.{axis}={size!r} must be a positive int or '
                       '-1 (all remaining devices).')
    sizes[axis] = int(size)
  shape_str = ', '.join(f'{field}.{a}={s}' for a, s in sizes.items())
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f'Only one mesh axis may be -1, got {shape_str}; set '
                     f'{field}.{rest[1]} to a size.')
  known = math.prod(s for s in sizes.values() if s != -1)
  if n % known or (not rest and known != n):
    bad = ([a for a, s in sizes.items() if s > 1 and n % s]
           or [a for a, s in sizes.items() if s > 1] or list(sizes))
    fix = (f'with {field}.{rest[0]}=-1 the other sizes must multiply to a '
           f'divisor of {n}' if rest else
           f'choose sizes whose product is {n}, or set one axis to -1 to '
           'take the remaining devices')
    raise ValueError(
        f'{" x ".join(f"{field}.{a}" for a in bad)} does not fit the {n} '
        f'devices ({shape_str}, product {known}); {fix}.')
  if rest:
    sizes[rest[0]] = n // known
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: shardings are hints to XLA's partitioner (GSPMD), which is what
  # logical-axis annotations assume; jax.make_mesh would default to Explicit.
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


# --------------------------------------------------------------------------
# Logical-axis rules.


def logical_rules(config_rules: Sequence[Sequence[Any]] | None = None,
                  field: str = 'mesh.rules') -> Rules:
  """`DEFAULT_RULES`, with pairs from the config taking precedence.

  `config_rules` is a list of [logical_name, mesh_axes] pairs, mesh_axes
  being an axis name, a list of names, or None (replicate). A logical name
  given in the config replaces all of its default pairs; other defaults stay.
  """
  overrides = []
  for i, pair in enumerate(config_rules or ()):
    if isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f'{field}[{i}]={pair!r}: each rule is a pair '
                       '[logical_name, mesh_axis or None].')
    name, axes = pair
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      names = axes
    else:
      names = () if axes is None else (axes,)
    for axis in names:
      if axis not in MESH_AXES:
        raise ValueError(f'{field}[{i}]={pair!r}: unknown mesh axis {axis!r}; '
                         f'the mesh axes are {list(MESH_AXES)}.')
    overrides.append((name, axes))
  given = {name for name, _ in overrides}
  return tuple(overrides) + tuple(r for r in DEFAULT_RULES if r[0] not in given)


# --------------------------------------------------------------------------
# Parameter shardings.


def _path_str(path: tuple[Any, ...]) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of boxed params (e.g. `jax.eval_shape(init)`).

  Boxes (`nn.LogicallyPartitioned`) map through `rules`; plain `nn.Partitioned`
  names are mesh axes already; unboxed leaves are replicated. The result has
  the structure of `nn.meta.unbox(tree)`, so split it with the same keys as
  the params (e.g. frozen / trainable). Dimensions a mesh axis does not
  divide are replicated, and logged once at INFO.
  """
  fallbacks = collections.defaultdict(list)

  def one(path, leaf):
    if not isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, P())
    shape = leaf.value.shape
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
    else:
      spec = P(*leaf.names)
    spec = list(spec) + [None] * (len(shape) - len(spec))
    for dim, axes in enumerate(spec):
      size = _axis_size(mesh, axes)
      if shape[dim] % size:
        # Replicating one dim is always correct, only less memory-efficient;
        # failing would tie model sizes to the mesh.
        name = leaf.names[dim] if dim < len(leaf.names) else None
        fallbacks[(name, shape[dim], axes, size)].append(
            _path_str(path))
        spec[dim] = None
    return NamedSharding(mesh, P(*spec))

  out = jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for (name, dim, axes, size), paths in fallbacks.items():
    logging.info(
        'Replicating logical axis %r (size %d, not divisible by mesh axis %r '
        'of size %d) in %d params, e.g. %s.', name, dim, axes, size,
        len(paths), paths[0])
    logging.debug('Replicated %r in: %s', name, ', '.join(paths))
  return out


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx.init(params)`: param-shaped leaves follow the params.

  Moments (Adam's mu/nu) live with their params; counters and other
  non-param leaves are replicated.
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_state, shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, metrics, rng keys)."""
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'); other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


@functools.lru_cache(maxsize=8)
def _process_shards(mesh: Mesh) -> dict[int, frozenset[int]]:
  """For each process, the batch shards (indices along BATCH_AXES) it holds.

  Cached: `global_batch` asks on every step and a pod has thousands of devices.
  """
  names = mesh.axis_names
  dp_shape = [mesh.shape[a] for a in BATCH_AXES]
  out = collections.defaultdict(set)
  for idx in np.ndindex(*mesh.devices.shape):
    coords = [idx[names.index(a)] for a in BATCH_AXES]
    out[mesh.devices[idx].process_index].add(
        int(np.ravel_multi_index(coords, dp_shape)))
  return {p: frozenset(s) for p, s in out.items()}


def check_batch_size(global_batch: int, mesh: Mesh,
                     field: str = 'train.batch_size') -> int:
  """Checks `global_batch` splits over the mesh; returns this process's rows.

  The data pipeline of process `jax.process_index()` should yield batches of
  the returned size from its own disjoint shard of the data.
  """
  dp = _axis_size(mesh, BATCH_AXES)
  dp_str = ' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in BATCH_AXES)
  if not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
    raise ValueError(f'{field}={global_batch!r} must be a positive int.')
  if global_batch % dp:
    lo = max(dp, global_batch // dp * dp)
    raise ValueError(
        f'{field}={global_batch} is not divisible by the {dp} data-parallel '
        f'devices ({dp_str}); use a multiple of {dp} (e.g. {lo} or '
        f'{lo + dp}) or change the mesh.')
  shards = _process_shards(mesh)
  counts = {len(s) for s in shards.values()}
  disjoint = (sum(len(s) for s in shards.values())
              == len(frozenset().union(*shards.values())))
  if len(counts) != 1 or not disjoint:
    raise ValueError(
        f'The mesh ({dp_str}, mesh.tensor={mesh.shape["tensor"]}) gives the '
        f'{len(shards)} processes overlapping or unequal parts of the batch, '
        'so per-process input pipelines cannot feed it; make mesh.data x '
        'mesh.fsdp a multiple of the process count and keep mesh.tensor '
        'within a host.')
  return global_batch * counts.pop() // dp


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, *,
                 whole: bool = False) -> dict[str, jax.Array]:
  """Global arrays, batch-sharded, from this process's slice of the batch.

  Each process passes its own rows (`check_batch_size` says how many); with
  one process that is the whole batch. A process's rows fill the batch
  shards its devices hold, in increasing shard order.

  `whole=True` is for batches every process holds in full (deterministic
  eval batches): each process then places only the rows its devices hold.
  """
  sharding = batch_sharding(mesh)
  local_shards = len(_process_shards(mesh)[jax.process_index()])
  dp = _axis_size(mesh, BATCH_AXES)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in 'biufc' or value.ndim == 0:
      raise TypeError(
          f'Batch field {key!r} (dtype {value.dtype}, shape {value.shape}) '
          'cannot become a batch-sharded device array; keep host-only '
          'fields (e.g. text) out of the batch passed to global_batch.')
    shards = dp if whole else local_shards
    if value.shape[0] % shards:
      raise ValueError(
          f'Batch field {key!r} has {value.shape[0]} rows, which do not '
          f'split over the {shards} batch shards '
          f'{"of the mesh" if whole else "of this process"}; see '
          'check_batch_size for valid batch sizes.')
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, value.shape if whole else None)
  return out
