"""The paper's bridge: f_cross(f_proj(H_A), H_B) for one layer pair.

    H_B[j] <- H_B[j] + W_O · MHA(q = H_B[j] W_Q, k = P W_K, v = P W_V),
    P = f_proj(H_A[i]) = H_A[i] W_P

Choices the paper leaves open (ours): the cross-attention is causal (anchor
position t reads augmenting positions s <= t, within its own document of a
packed row); queries and projected keys are RMS-normalised; the output
projection W_O starts at zero, so the composed model begins exactly as the
anchor. `composition.py` joins bridges to layers; our variants are in
`bridges.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import transformer

Array = jax.Array


def dense(features, axis, names, name, init=nn.initializers.lecun_normal()):
  """A bias-free float32 projection with logical axis names."""
  return nn.DenseGeneral(features, axis=axis, use_bias=False,
                         dtype=jnp.float32, name=name,
                         kernel_init=nn.with_logical_partitioning(init, names))


HEADS = ('embed', 'heads', 'head_dim')  # Logical axes of q/k/v kernels.
OUT = ('heads', 'head_dim', 'embed')  # And of the output projection.


def keys_values_mask(module: nn.Module, k: Array | None, v: Array,
                     mask: Array | None, prompt_len: Array | None,
                     decode: bool | str, cache_len: int, t: int,
                     slots: Array | None = None):
  """The keys, values and mask a bridge attends with.

  Training and scoring: `mask` as the composition gives it (causal, per
  document), or s <= t. Decoding: the projected augmenting states of every
  step so far, from the bridge's cache. Either way only s < `prompt_len`
  when it is given (the prompt-only ablation).

  Aligned decoding (decode=SLOTS): this call's augmenting states go to the
  cache slots `slots` [b, s] (their positions in the augmenting stream),
  and `mask` [b, 1, t, cache_len] says which slots each query reads.
  """
  if decode == transformer.SLOTS:
    k, v, _ = transformer.update_cache(module, k, v, cache_len, slots)
  elif decode:
    k, v, mask = transformer.update_cache(module, k, v, cache_len)
  elif mask is None:
    mask = transformer.causal_mask(t)
  if prompt_len is not None:
    mask = mask & (jnp.arange(v.shape[1])[None, None, None, :]
                   < prompt_len[:, None, None, None])
  return k, v, mask


class PaperBridge(nn.Module):
  """f_cross(f_proj(H_A), H_B) for one layer pair: [b, t, D_B]."""
  d_model: int
  num_heads: int
  cache_len: int = 512  # Decode-time slots: the anchor's max_len.

  @nn.compact
  def __call__(self, anchor_h: Array, aug_h: Array, *,
               mask: Array | None = None, prompt_len: Array | None = None,
               decode: bool | str = False, positions: Array | None = None,
               slots: Array | None = None) -> Array:
    del positions  # The paper's f_cross has no positional term.
    h, d = self.num_heads, self.d_model // self.num_heads
    # f_proj: D_A -> D_B (then RMS-normalised: ours).
    proj = dense(self.d_model, -1, ('aug_embed', 'embed'), 'proj')(aug_h)
    proj = transformer.Norm('rmsnorm', 1e-6, name='kv_norm')(proj)
    # f_cross: queries from the anchor stream, keys and values from m_A.
    query_in = transformer.Norm('rmsnorm', 1e-6, name='q_norm')(anchor_h)
    q = dense((h, d), -1, HEADS, 'query')(query_in)
    k = dense((h, d), -1, HEADS, 'key')(proj)
    v = dense((h, d), -1, HEADS, 'value')(proj)
    k, v, mask = keys_values_mask(self, k, v, mask, prompt_len, decode,
                                  self.cache_len, anchor_h.shape[1], slots)
    out, probs = transformer.dot_product_attention(q, k, v, mask,
                                                   return_probs=True)
    # Which augmenting positions each anchor position reads, for plots:
    # apply(..., mutable=['intermediates']).
    self.sow('intermediates', 'attention', probs)
    # Zero at init: the composition starts exactly as the anchor.
    return dense(self.d_model, (-2, -1), OUT, 'out',
                 nn.initializers.zeros)(out)
