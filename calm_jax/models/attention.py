"""Causal self-attention kernels, chosen by platform (MaxText's attention_op).

`DecoderConfig.attention` (config field `attention`) picks one:

  xla     the einsum attention of `transformer.dot_product_attention`: runs
          everywhere, and does everything (soft-capping, sliding windows,
          packed rows, decoding); over 128 positions or more it skips the
          key blocks above the causal diagonal.
  cudnn   cuDNN's fused flash attention through
          `jax.nn.dot_product_attention(implementation='cudnn')`: GPUs, in
          bfloat16 or float16, causal (with or without a sliding window),
          without logit soft-capping or packed rows.
  splash  the Pallas splash-attention kernel for TPUs: causal or sliding
          window, soft-capping, packed rows (segment ids), sequences in
          whole 128-token blocks. Off TPU it runs in Pallas' interpreter
          (slow: for testing its numerics only).
  auto    (the default) splash on TPU, cudnn on GPU, xla on CPU, and xla
          wherever the chosen kernel cannot take the call, with one log
          line naming why.

An explicit `cudnn` or `splash` that cannot take a call is an error naming
the field. Decoding (one query against the cache) always runs `xla`.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')
_SPLASH_BLOCK = 128  # splash's default block size, in tokens.


def _cudnn_refusal(dtype, softcap, segment_ids) -> str:
  """Why cudnn cannot take this call ('' when it can)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'cuDNN flash attention needs bfloat16 or float16, not {dtype}'
  if softcap is not None:
    return 'cuDNN flash attention has no logit soft-capping'
  if segment_ids is not None:
    return 'packed rows (segment ids) are not passed to cuDNN'
  return ''


def _splash_refusal(length: int) -> str:
  if length % _SPLASH_BLOCK:
    return (f'splash attention takes whole {_SPLASH_BLOCK}-token blocks; '
            f'this sequence has {length} tokens')
  return ''


@functools.lru_cache(maxsize=None)
def _log_fallback(wanted: str, why: str) -> None:
  """One line per distinct reason, not one per layer or trace."""
  logging.info('attention=auto: xla instead of %s (%s).', wanted, why)


def check_name(requested: str, field: str = 'attention') -> None:
  """Refuses a kernel name that is not one of IMPLEMENTATIONS."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f'{field}={requested!r} is not an attention kernel; '
                     f'choose one of {list(IMPLEMENTATIONS)}.')


def choose(requested: str, *, platform: str, dtype, length: int,
           softcap: float | None, segment_ids: Array | None,
           field: str = 'attention') -> str:
  """The kernel that runs a causal self-attention call."""
  check_name(requested, field)
  if requested == 'xla':
    return 'xla'
  wanted = requested
  if requested == 'auto':
    wanted = {'tpu': 'splash', 'gpu': 'cudnn'}.get(platform, 'xla')
    if wanted == 'xla':
      return 'xla'
  why = (_cudnn_refusal(dtype, softcap, segment_ids) if wanted == 'cudnn'
         else _splash_refusal(length))
  if wanted == 'cudnn' and not why and platform != 'gpu':
    why = f'cuDNN runs on GPUs only, and this is {platform}'
  if not why:
    return wanted
  if requested == 'auto':
    _log_fallback(wanted, why)
    return 'xla'
  raise ValueError(f"{field}='{requested}': {why}; use attention='auto' "
                   "(which falls back to 'xla') or 'xla'.")


def cudnn(q: Array, k: Array, v: Array, *, scale: float, window: int,
          implementation: str = 'cudnn') -> Array:
  """Causal flash attention through jax.nn.dot_product_attention.

  q [b, t, h, d]; k, v [b, t, kv, d] (grouped-query heads as they are).
  `implementation` is 'cudnn' on GPUs ('xla' checks the call's numerics
  anywhere).
  """
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True,
      local_window_size=(window - 1, 0) if window else None,
      implementation=implementation)


def splash(q: Array, k: Array, v: Array, *, scale: float, window: int,
           softcap: float | None, segment_ids: Array | None,
           interpret: bool | None = None) -> Array:
  """Causal attention with the Pallas splash kernel (TPU).

  q [b, t, h, d]; k, v [b, t, kv, d]; `segment_ids` [b, t] (packed rows)
  keep attention within each document. Off TPU the kernel runs in Pallas'
  interpreter (`interpret` None: whenever the platform is not a TPU).
  """
  # Deferred: Pallas' TPU modules are only needed where splash runs.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib)
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_mask as mask_lib)
  b, t, h, d = q.shape
  kv = k.shape[2]
  if interpret is None:
    interpret = jax.devices()[0].platform != 'tpu'
  if window:
    one = mask_lib.LocalMask((t, t), (window - 1, 0), offset=0)
  else:
    one = mask_lib.CausalMask((t, t))
  mask = mask_lib.MultiHeadMask([one] * h)
  kernel = kernel_lib.make_splash_mha(
      mask, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
      interpret=interpret)
  # The kernel takes [heads, t, d] per example, queries pre-scaled, and one
  # key/value head per query head.
  q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
  k = jnp.swapaxes(jnp.repeat(k, h // kv, axis=2), 1, 2)
  v = jnp.swapaxes(jnp.repeat(v, h // kv, axis=2), 1, 2)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, s: kernel(
        q, k, v, segment_ids=kernel_lib.SegmentIds(q=s, kv=s)))(q, k, v, ids)
  return jnp.swapaxes(out, 1, 2).astype(v.dtype).reshape(b, t, h, d)
