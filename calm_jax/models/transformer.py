"""A configurable decoder-only transformer in Flax linen.

One module covers the usual families (GPT-2, Llama, Gemma, ...) through
`DecoderConfig`: RMSNorm or LayerNorm, RoPE or learned positions, gated or
plain MLP, multi-head or grouped-query attention, tied or separate embeddings.

The forward pass is split into `embed`, `block` and `head` so that a parent
module (the CALM composition) can read hidden states after chosen layers and
add to the residual stream between layers. Every parameter carries logical
axis names so that the same code shards over any mesh.

Packed rows (several documents in one row) pass `segment_ids` (1, 2, ... per
document, 0 for padding) and `positions` (restarting at 0 in every
document): attention never crosses a document boundary.

Decoding uses linen's `cache` collection: call with `decode=True` and the
next tokens (a prompt to prefill, then one token per step); positions come
from the cache index. `decode=SLOTS` with
`positions` [b, t] writes several tokens per call, each row at its own
positions (which are its cache slots), and may go back by writing over a
slot again: what aligned decoding needs when a token stream is
re-tokenized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import attention as attention_lib

Array = jax.Array

NORMS = ('rmsnorm', 'layernorm')
POSITIONS = ('rope', 'learned', 'none')
MLPS = ('gated_silu', 'gated_gelu', 'gelu', 'relu')
# `decode=SLOTS`: per-row cache slots given by the positions.
SLOTS = 'slots'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of one decoder LM. Frozen so it can be a module field."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  num_kv_heads: int | None = None  # None: multi-head (= num_heads).
  head_dim: int | None = None  # None: d_model // num_heads.
  max_len: int = 512
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-6
  position: str = 'rope'
  rope_theta: float = 10_000.0
  mlp: str = 'gated_silu'
  tie_embeddings: bool = True
  # Gemma multiplies embeddings by sqrt(d_model).
  scale_embeddings: bool = False
  use_bias: bool = False
  # Biases on the query/key/value projections only (Qwen2).
  qkv_bias: bool = False
  # RMSNorm multiplies by (offset + scale); Gemma stores scale - 1.
  norm_scale_offset: float = 0.0
  # RoPE frequency scaling: 'none' or 'llama3' (with the fields below).
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  logit_softcap: float | None = None
  # Gemma 2/3: tanh soft-capping of attention logits; query scaling other
  # than head_dim ** -0.5; norms after attention and MLP outputs too.
  attn_logit_softcap: float | None = None
  query_scale: float | None = None
  post_norms: bool = False
  # Sliding-window (local) attention on `sliding_layers`, whose RoPE may use
  # its own base (`local_rope_theta`, unscaled); Gemma 3 also normalises
  # queries and keys per head.
  sliding_window: int = 0
  sliding_layers: tuple[int, ...] = ()
  local_rope_theta: float | None = None
  qk_norm: bool = False
  dtype: str = 'float32'  # Compute dtype.
  param_dtype: str = 'float32'
  # Recompute each block's activations in the backward pass instead of
  # storing them: less memory for about one more forward's FLOPs.
  remat: bool = False
  # The self-attention kernel (models/attention.py): 'auto' picks splash on
  # TPU, cuDNN on GPU, XLA elsewhere. A runtime choice, like `remat`.
  attention: str = 'auto'

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self, field: str = 'model') -> 'DecoderConfig':
    """Raises ValueError naming `field.<name>` for any inconsistent value."""
    def fail(name, msg):
      raise ValueError(f'{field}.{name}: {msg}')
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff',
                 'max_len'):
      if int(getattr(self, name)) <= 0:
        fail(name, f'must be a positive integer, got {getattr(self, name)}.')
    if self.head_dim is None and self.d_model % self.num_heads:
      fail('num_heads', f'd_model={self.d_model} is not divisible by '
           f'num_heads={self.num_heads}; set head_dim or change num_heads.')
    if self.num_heads % self.kv_heads:
      fail('num_kv_heads', f'num_heads={self.num_heads} must be a multiple '
           f'of num_kv_heads={self.kv_heads}.')
    if self.position == 'rope' and self.dim_per_head % 2:
      fail('head_dim', 'RoPE needs an even head dimension.')
    if self.rope_scaling not in ('none', 'llama3', 'linear'):
      fail('rope_scaling', f"unknown value {self.rope_scaling!r}; choose "
           "'none', 'linear' or 'llama3'.")
    for i in self.sliding_layers:
      if not 0 <= i < self.num_layers:
        fail('sliding_layers', f'layer {i} is out of range 0..'
             f'{self.num_layers - 1}.')
    if self.sliding_layers and self.sliding_window <= 0:
      fail('sliding_window', 'must be positive when sliding_layers is set.')
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      fail('attention', f'unknown kernel {self.attention!r}; choose one of '
           f'{list(attention_lib.IMPLEMENTATIONS)}.')
    for name, choices in (('norm', NORMS), ('position', POSITIONS),
                          ('mlp', MLPS), ('dtype', DTYPES),
                          ('param_dtype', DTYPES)):
      if getattr(self, name) not in choices:
        fail(name, f'unknown value {getattr(self, name)!r}; choose one of '
             f'{sorted(choices)}.')
    return self

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], field: str = 'model'
                ) -> 'DecoderConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'{field}: unknown architecture fields {unknown}; '
                       f'known fields are {sorted(known)}.')
    # JSON turns tuples into lists; configs must stay hashable.
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d).validate(field)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _init(initializer, names: Sequence[str | None]):
  return nn.with_logical_partitioning(initializer, tuple(names))


def _softcap(x: Array, cap: float | None) -> Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def rope_frequencies(cfg: DecoderConfig) -> Array:
  """Inverse frequencies of the rotary embedding (HF's `inv_freq`)."""
  half = cfg.dim_per_head // 2
  freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling == 'linear':
    freq = freq / cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a
    # smooth blend between (transformers' _compute_llama3_parameters).
    wavelen = 2 * jnp.pi / freq
    low = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = ((cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    blended = (1 - smooth) * freq / cfg.rope_factor + smooth * freq
    freq = jnp.where(wavelen > low, freq / cfg.rope_factor,
                     jnp.where(wavelen < high, freq, blended))
  return freq


def rope(x: Array, positions: Array, freq: Array) -> Array:
  """Rotary embedding on [..., length, heads, head_dim] (half-split layout)."""
  angle = positions[..., :, None, None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Norm(nn.Module):
  """RMSNorm or LayerNorm, computed in float32."""
  kind: str
  eps: float
  param_dtype: Any = jnp.float32
  scale_offset: float = 0.0  # Gemma: x * (1 + scale).
  axis_name: str = 'embed'  # Logical name of the normalised axis.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    scale = self.param(
        'scale', _init(nn.initializers.constant(1.0 - self.scale_offset),
                       (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    scale = scale.astype(jnp.float32) + self.scale_offset
    if self.kind == 'rmsnorm':
      x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
      return (x * scale).astype(dtype)
    mean = jnp.mean(x, -1, keepdims=True)
    x = x - mean
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
    bias = self.param('bias', _init(nn.initializers.zeros, ('embed',)),
                      (x.shape[-1],), self.param_dtype)
    return (x * scale + bias).astype(dtype)


def _causal_blocks(t: int, s: int) -> int:
  """Query blocks for causal self-attention over t positions (1: whole).

  Blocks of max(64, t / 8) positions, whole ones only: below 64 the dots get
  too small to gain, and at most 8 keeps the program small.
  """
  if t != s or t < 128:
    return 1
  block = max(64, t // 8)
  return t // block if t % block == 0 else 1


def _block(x: Array, start: int, stop: int) -> Array:
  """Rows [start, stop) and keys [0, stop) of a [..., t, s] mask or bias
  (a size-1 axis is broadcast, so kept)."""
  if x.shape[-2] != 1:
    x = x[..., start:stop, :]
  if x.shape[-1] != 1:
    x = x[..., :stop]
  return x


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array,
                          softcap: float | None = None,
                          scale: float | None = None,
                          return_probs: bool = False,
                          bias: Array | None = None,
                          causal: bool = False
                          ) -> Array | tuple[Array, Array]:
  """q [b, t, h, d]; k, v [b, s, kv, d]; mask broadcastable to [b, h, t, s].

  `bias` (broadcastable to [b, h, t, s]) is added to the logits. `causal`:
  the caller promises that `mask` lets no query read a later key (s == t),
  so whole blocks above the diagonal may be skipped (`_causal_blocks`).

  Grouped-query attention shares each key/value head across h // kv query
  heads. Softmax runs in float32 whatever the compute dtype.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  if kv == h:
    # Multi-head: plain [b, h, t, s] einsums, the mask broadcast where it is
    # used. A size-1 group axis (the grouped form below) and a materialised
    # mask cost XLA:CPU ~15% of the attention's time (forward and backward).
    # More than one query: q, k, v move to [b, h, t, d] first, so that every
    # dot, forward and backward, is a batched matmul with its batch axes
    # leading; from [b, t, h, d] each dot transposes its own operands (the
    # `peer` anchor's attention dots alone: 48-52 against 25-33 GFLOP/s on
    # an AVX2 host; docs/research/performance.md). One decoded query reads
    # the cache where it lies.
    heads_first = t > 1
    if heads_first:
      q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    qs, ks = ('bhtd', 'bhsd') if heads_first else ('bthd', 'bshd')

    def attend(q, k, v, mask, bias):
      logits = _softcap(jnp.einsum(f'{qs},{ks}->bhts', q, k,
                                   preferred_element_type=jnp.float32)
                        * scale, softcap)
      if bias is not None:
        logits = logits + bias
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      return jnp.einsum(f'bhts,{ks}->{qs}', probs, v), probs

    blocks = (_causal_blocks(t, k.shape[2])
              if causal and heads_first and not return_probs else 1)
    if blocks == 1:
      out, probs = attend(q, k, v, mask, bias)
    else:
      # Query block i reads keys [0, (i + 1) c): the blocks above the
      # diagonal, all masked, are never computed (the `peer` anchor's
      # attention forward and backward: 72 -> 59 ms with 4 blocks).
      c, probs = t // blocks, None
      out = jnp.concatenate([attend(
          q[:, :, i * c:(i + 1) * c], k[:, :, :(i + 1) * c],
          v[:, :, :(i + 1) * c], _block(mask, i * c, (i + 1) * c),
          None if bias is None else _block(bias, i * c, (i + 1) * c))[0]
                             for i in range(blocks)], axis=2)
    if heads_first:
      out = out.transpose(0, 2, 1, 3)
    return (out, probs) if return_probs else out
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = _softcap(logits, softcap)
  if bias is not None:
    logits = logits + jnp.broadcast_to(bias, (b, h, t, k.shape[1])).reshape(
        logits.shape)
  mask = jnp.broadcast_to(mask, (b, h, t, k.shape[1]))
  mask = mask.reshape(b, kv, h // kv, t, k.shape[1])
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, d)
  if return_probs:  # [b, h, t, s].
    return out, probs.reshape(b, h, t, k.shape[1])
  return out


def causal_mask(length: int, segment_ids: Array | None = None,
                window: int = 0) -> Array:
  """[b or 1, 1, t, t]: position t attends to s <= t of its own document.

  `segment_ids` [b, t] number the documents of packed rows (0: padding,
  which attends only to padding); `window` > 0 also limits attention to the
  last `window` positions (sliding-window layers).
  """
  idx = jnp.arange(length)
  mask = idx[None, :] <= idx[:, None]
  if window:
    mask = mask & (idx[:, None] - idx[None, :] < window)
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] ==
                   segment_ids[:, None, None, :])
  return mask


class SelfAttention(nn.Module):
  """Causal self-attention with optional grouped-query heads and a KV cache."""
  config: DecoderConfig
  local: bool = False  # Sliding-window layer.

  @nn.compact
  def __call__(self, x: Array, positions: Array, decode: bool = False,
               segment_ids: Array | None = None) -> Array:
    cfg = self.config
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    h, kv, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    dense = lambda feats, axes, names, name: nn.DenseGeneral(
        feats, axis=axes, dtype=dtype,
        use_bias=cfg.use_bias or (cfg.qkv_bias and name != 'out'),
        param_dtype=pdtype, name=name,
        kernel_init=_init(nn.initializers.lecun_normal(), names),
        bias_init=_init(nn.initializers.zeros, names[-len(
            feats if isinstance(feats, tuple) else (feats,)):]))
    q = dense((h, d), -1, ('embed', 'heads', 'head_dim'), 'query')(x)
    k = dense((kv, d), -1, ('embed', 'kv_heads', 'head_dim'), 'key')(x)
    v = dense((kv, d), -1, ('embed', 'kv_heads', 'head_dim'), 'value')(x)
    if cfg.qk_norm:
      norm = lambda name: Norm('rmsnorm', cfg.norm_eps, pdtype,
                               cfg.norm_scale_offset, 'head_dim', name=name)
      q, k = norm('query_norm')(q), norm('key_norm')(k)
    if cfg.position == 'rope':
      rope_cfg = cfg
      if self.local and cfg.local_rope_theta:
        rope_cfg = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta,
                                       rope_scaling='none')
      freq = rope_frequencies(rope_cfg)
      q = rope(q, positions, freq)
      k = rope(k, positions, freq)

    if decode:
      slots = positions if decode == SLOTS else None
      k, v, mask = update_cache(self, k, v, cfg.max_len, slots)
      if self.local:
        # Each query's own slot is its position (decode=True counts both
        # from the same index; under SLOTS the positions are the slots).
        mask = mask & (jnp.arange(cfg.max_len)[None, None, None, :]
                       > positions[:, None, :, None] - cfg.sliding_window)
      out = dot_product_attention(q, k, v, mask, cfg.attn_logit_softcap,
                                  cfg.query_scale)
    else:
      out = causal_attention(cfg, q, k, v, segment_ids,
                             cfg.sliding_window if self.local else 0)
    return dense(cfg.d_model, (-2, -1), ('heads', 'head_dim', 'embed'),
                 'out')(out)


def causal_attention(cfg: DecoderConfig, q: Array, k: Array, v: Array,
                     segment_ids: Array | None, window: int) -> Array:
  """Causal self-attention over a whole sequence, by the kernel
  `cfg.attention` chooses for this platform (models/attention.py)."""
  impl = attention_lib.choose(
      cfg.attention, platform=jax.default_backend(), dtype=q.dtype,
      length=q.shape[1], softcap=cfg.attn_logit_softcap,
      segment_ids=segment_ids)
  scale = cfg.query_scale or q.shape[-1] ** -0.5
  if impl == 'cudnn':
    return attention_lib.cudnn(q, k, v, scale=scale, window=window)
  if impl == 'splash':
    return attention_lib.splash(q, k, v, scale=scale, window=window,
                                softcap=cfg.attn_logit_softcap,
                                segment_ids=segment_ids)
  mask = causal_mask(q.shape[1], segment_ids, window)
  return dot_product_attention(q, k, v, mask, cfg.attn_logit_softcap,
                               cfg.query_scale, causal=True)


def update_cache(module: nn.Module, k: Array | None, v: Array, max_len: int,
                 slots: Array | None = None):
  """Writes one call's keys/values into the module's cache; returns all.

  The cache holds `max_len` slots and an index, the next free slot: the t
  tokens of a call go to slots i..i+t-1 and token q attends to slots
  0..i+q (one token per call while decoding; a whole prompt in one call to
  prefill it). As in the Flax examples, `init(..., decode=True)` only
  creates the zero cache.
  `k=None` caches values only (attention without a content term) and
  returns None for the keys.

  `slots` [b, t] (decode=SLOTS) writes token i of row r to slot
  slots[r, i] instead, several tokens per call, and each attends to the
  slots up to its own: rows advance, or go back, on their own (aligned
  decoding). A slot >= max_len writes nothing (padding).
  """
  b, t, heads, d = v.shape
  if slots is not None:
    ck = None if k is None else module.variable(
        'cache', 'cached_key', jnp.zeros, (b, max_len) + k.shape[2:],
        k.dtype)
    cv = module.variable('cache', 'cached_value', jnp.zeros,
                         (b, max_len, heads, d), v.dtype)
    rows = jnp.arange(b)[:, None]
    if ck is not None:
      ck.value = ck.value.at[rows, slots].set(k.astype(ck.value.dtype),
                                              mode='drop')
    cv.value = cv.value.at[rows, slots].set(v.astype(cv.value.dtype),
                                            mode='drop')
    mask = jnp.arange(max_len)[None, None, None, :] <= slots[:, None, :, None]
    return None if ck is None else ck.value, cv.value, mask
  initialized = module.has_variable('cache', 'cached_value')
  ck = None if k is None else module.variable(
      'cache', 'cached_key', jnp.zeros, (b, max_len) + k.shape[2:], k.dtype)
  cv = module.variable('cache', 'cached_value', jnp.zeros, (b, max_len, heads, d),
                       v.dtype)
  idx = module.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
  i = idx.value
  if initialized:  # The init pass only creates the (zero) cache.
    if ck is not None:
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
    idx.value = i + t
  # Token q of this call sits at slot i + q and reads the slots up to it.
  mask = jnp.arange(max_len)[None, :] <= (i + jnp.arange(t))[:, None]
  return None if ck is None else ck.value, cv.value, mask[None, None]


class Mlp(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    dense = lambda feats, names, name: nn.Dense(
        feats, use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype,
        name=name, kernel_init=_init(nn.initializers.lecun_normal(), names),
        bias_init=_init(nn.initializers.zeros, names[-1:]))
    act = {'gated_silu': nn.silu, 'relu': nn.relu,
           'gated_gelu': lambda y: nn.gelu(y, approximate=True),
           'gelu': lambda y: nn.gelu(y, approximate=True)}[cfg.mlp]
    hidden = act(dense(cfg.d_ff, ('embed', 'mlp'), 'wi')(x))
    if cfg.mlp.startswith('gated'):
      hidden = hidden * dense(cfg.d_ff, ('embed', 'mlp'), 'wi_gate')(x)
    return dense(cfg.d_model, ('mlp', 'embed'), 'wo')(hidden)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  With `post_norms` (Gemma 2/3) each branch's output is normalised too.
  """
  config: DecoderConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x: Array, positions: Array, decode: bool = False,
               segment_ids: Array | None = None) -> Array:
    cfg = self.config
    pdtype = DTYPES[cfg.param_dtype]
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, pdtype,
                             cfg.norm_scale_offset, name=name)
    local = self.layer in cfg.sliding_layers
    y = SelfAttention(cfg, local, name='attn')(norm('attn_norm')(x),
                                               positions, decode, segment_ids)
    x = x + (norm('post_attn_norm')(y) if cfg.post_norms else y)
    y = Mlp(cfg, name='mlp')(norm('mlp_norm')(x))
    return x + (norm('post_mlp_norm')(y) if cfg.post_norms else y)


class DecodePosition(nn.Module):
  """Counts the tokens seen while decoding (a `cache` variable)."""

  @nn.compact
  def __call__(self, length: int) -> Array:
    initialized = self.has_variable('cache', 'index')
    idx = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    pos = idx.value
    if initialized:  # The init pass only creates the (zero) cache.
      idx.value = pos + length
    return pos


class Decoder(nn.Module):
  """Decoder-only LM. `__call__` gives logits; the pieces are public.

  `embed`, `block(i, ...)` and `head` let a parent interleave its own
  computation between layers (see `calm_jax.models.composition`).
  """
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    pdtype = DTYPES[cfg.param_dtype]
    self.embedding = self.param(
        # Unit-scale logits at init whether or not the head is tied.
        'embedding', _init(nn.initializers.normal(cfg.d_model ** -0.5),
                           ('vocab', 'embed')),
        (cfg.vocab_size, cfg.d_model), pdtype)
    if cfg.position == 'learned':
      self.pos_embedding = self.param(
          'pos_embedding', _init(nn.initializers.normal(0.02),
                                 (None, 'embed')),
          (cfg.max_len, cfg.d_model), pdtype)
    # `decode` (argument 3, counting self) is a Python bool.
    block = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
    self.layers = [block(cfg, i, name=f'layer_{i}')
                   for i in range(cfg.num_layers)]
    self.final_norm = Norm(cfg.norm, cfg.norm_eps, pdtype,
                           cfg.norm_scale_offset)
    self.decode_position = DecodePosition()
    if not cfg.tie_embeddings:
      self.unembedding = self.param(
          'unembedding', _init(nn.initializers.lecun_normal(),
                               ('embed', 'vocab')),
          (cfg.d_model, cfg.vocab_size), pdtype)

  def positions(self, tokens: Array, decode: bool,
                positions: Array | None = None) -> Array:
    """Positions of `tokens`: `positions` if given (packed rows restart
    them per document), else 0, 1, ...; while decoding, the number of
    tokens seen."""
    if decode == SLOTS or not decode:
      if positions is not None:
        return positions
      if decode:
        raise ValueError(f'decode={SLOTS!r} needs the token positions (they '
                         'are the cache slots).')
      return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    pos = self.decode_position(tokens.shape[1])
    return jnp.broadcast_to(pos + jnp.arange(tokens.shape[1]), tokens.shape)

  def embed(self, tokens: Array, positions: Array) -> Array:
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.position == 'learned':
      x = x + jnp.take(self.pos_embedding, positions, axis=0,
                       mode='clip').astype(dtype)
    return x

  def block(self, i: int, x: Array, positions: Array, decode: bool = False,
            segment_ids: Array | None = None) -> Array:
    return self.layers[i](x, positions, decode, segment_ids)

  def head(self, x: Array) -> Array:
    """Final norm and unembedding; logits are float32."""
    cfg = self.config
    x = self.final_norm(x)
    w = self.embedding.T if cfg.tie_embeddings else self.unembedding
    logits = jnp.einsum('btd,dv->btv', x, w.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return _softcap(logits, cfg.logit_softcap)

  def __call__(self, tokens: Array, *, decode: bool = False,
               positions: Array | None = None,
               segment_ids: Array | None = None,
               return_hidden: Sequence[int] = (),
               residual_adds: Mapping[int, Array] | None = None,
               ) -> Array | tuple[Array, dict[int, Array]]:
    """Logits [b, t, vocab] for int tokens [b, t].

    Args:
      tokens: input ids.
      decode: read and write the `cache` collection: `tokens` follow the
        ones already cached (a prompt to prefill, or one token per step).
      positions: [b, t] token positions (default 0, 1, ...); packed rows
        restart them in every document.
      segment_ids: [b, t] document of each token in packed rows (0:
        padding); attention stays within a document.
      return_hidden: layer indices whose outputs (the residual stream after
        that block) are also returned, as a dict.
      residual_adds: {layer: array} added to the residual stream right after
        that layer, before the next layer reads it.
    """
    positions = self.positions(tokens, decode, positions)
    x = self.embed(tokens, positions)
    hidden = {}
    for i in range(self.config.num_layers):
      x = self.block(i, x, positions, decode, segment_ids)
      if residual_adds and i in residual_adds:
        x = x + residual_adds[i].astype(x.dtype)
      if i in return_hidden:
        hidden[i] = x
    logits = self.head(x)
    return (logits, hidden) if return_hidden else logits

  def hidden_states(self, tokens: Array, layers: Sequence[int],
                    decode: bool = False, positions: Array | None = None,
                    segment_ids: Array | None = None) -> dict[int, Array]:
    """Hidden states after `layers`, skipping everything above the highest."""
    positions = self.positions(tokens, decode, positions)
    x = self.embed(tokens, positions)
    out = {}
    for i in range(max(layers) + 1):
      x = self.block(i, x, positions, decode, segment_ids)
      if i in layers:
        out[i] = x
    return out


def cast(config: DecoderConfig, params: Any, dtype: str
         ) -> tuple[DecoderConfig, Any]:
  """A model held and computed in `dtype` (its config and params)."""
  if dtype == config.param_dtype and dtype == config.dtype:
    return config, params
  config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
  target = DTYPES[dtype]
  return config, jax.jit(lambda p: jax.tree_util.tree_map(
      lambda x: x.astype(target), p))(params)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
