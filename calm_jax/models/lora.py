"""LoRA on a frozen parameter tree, applied functionally.

The paper's main baseline trains low-rank adapters on the anchor with a rank
chosen so the adapter has as many parameters as CALM's bridges. Rather than
threading adapters through every module, the adapters are a separate
trainable tree and `merge` forms `W + (alpha / r) * A @ B` for each targeted
kernel inside the loss function, so the model code is untouched, the frozen
tree never changes, and only `A`, `B` reach the optimizer and checkpoint.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Attention query and value projections, as in the LoRA paper.
DEFAULT_TARGETS = (r'attn/query/kernel$', r'attn/value/kernel$')


def _path(path) -> str:
  return '/'.join(str(getattr(p, 'key', p)) for p in path)


def _split(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of a kernel: the attention output contracts two axes."""
  n_in = 2 if path.endswith('attn/out/kernel') else 1
  return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def targets_of(frozen: Any, targets: Sequence[str] = DEFAULT_TARGETS
               ) -> dict[str, tuple[int, ...]]:
  """{path: kernel shape} of every kernel matched by a `targets` regex."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(frozen):
    p = _path(path)
    if any(re.search(t, p) for t in targets):
      out[p] = tuple(leaf.shape)
  if not out:
    raise ValueError(f'lora.targets={list(targets)} match no kernel; the '
                     'kernels look like "layer_0/attn/query/kernel".')
  return out


def num_params(frozen: Any, rank: int,
               targets: Sequence[str] = DEFAULT_TARGETS) -> int:
  return sum(rank * sum(_split(p, s)) for p, s in
             targets_of(frozen, targets).items())


def rank_for_budget(frozen: Any, budget: int,
                    targets: Sequence[str] = DEFAULT_TARGETS) -> int:
  """The rank whose adapter size is closest to `budget` parameters."""
  per_rank = num_params(frozen, 1, targets)
  return max(1, int(round(budget / per_rank)))


def init(rng: jax.Array, frozen: Any, rank: int,
         targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Any]:
  """Adapters {path: {'a': [in, r], 'b': [r, out]}}; B starts at zero."""
  if rank <= 0:
    raise ValueError(f'lora.rank must be positive, got {rank}.')
  shapes = targets_of(frozen, targets)
  keys = jax.random.split(rng, len(shapes))
  out = {}
  for key, (p, shape) in zip(keys, sorted(shapes.items())):
    fan_in, fan_out = _split(p, shape)
    out[p] = {
        'a': nn.Partitioned(jax.random.normal(key, (fan_in, rank))
                            / math.sqrt(fan_in), (None, None)),
        'b': nn.Partitioned(jnp.zeros((rank, fan_out)), (None, None))}
  return out


def merge(frozen: Any, adapters: dict[str, Any], alpha: float | None = None
          ) -> Any:
  """`frozen` with each adapted kernel replaced by W + (alpha/r) A @ B."""
  def one(path, w):
    p = _path(path)
    if p not in adapters:
      return w
    a, b = adapters[p]['a'], adapters[p]['b']
    scale = (alpha or a.shape[1]) / a.shape[1]
    delta = (a @ b).reshape(w.shape) * scale
    return w + delta.astype(w.dtype)
  return jax.tree_util.tree_map_with_path(one, frozen)
