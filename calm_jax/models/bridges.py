"""Our bridge variants, beyond the paper's (`paper_bridge.PaperBridge`).

`composition.bridge='ours'` selects `OursBridge`; its options are the config
fields `composition.ours.*`. With every option at its default it computes
what the paper's bridge computes. Each option is a hypothesis we measured
at CPU scale (docs/design.md, docs/research/):

  recency_bias       a learnt per-head bias -slope_h * (t - s) on the logits
                     (ALiBi's form), so a head can find m_A's state at its own
                     position among earlier ones holding the same token; the
                     paper's f_cross has no positional term.
  recency_max_slope  the sharpest head's initial slope (the others start
                     geometrically flatter, down to 1/64 of it).
  anchor_queries     False drops the content term (no query or key
                     projections): heads weigh m_A's positions by the
                     recency bias alone. For bridges into an anchor's
                     embeddings of tokens it never trained on.
  proj_hidden        > 0 follows f_proj with a residual GELU MLP of this
                     width: a non-linear map from m_A's state to what the
                     anchor needs.
  gate               a tanh gate per bridge, closed at init (Flamingo's):
                     the output projection starts random instead of zero,
                     and the gate opens as the bridge earns it.
  source_gate        a sigmoid gate per m_A position and head, read off m_A's
                     own state, on the values the heads read: a bridge can
                     fall silent at positions where m_A has nothing to add
                     (e.g. the anchor's own digits) with one direction of
                     m_A's state, instead of cancelling its write.
  anchor_gate        a sigmoid gate per anchor position and head, read off
                     the anchor's own (RMS-normalised) state at the bridge's
                     query side, on what each head writes: the anchor, not
                     m_A, says where it takes help (the paper's anchor
                     queries play that part through attention; with
                     `anchor_queries=False` nothing else does).

Writing into the anchor's embeddings is not a bridge option but a layer
pair: anchor layer -1 (`composition.validate_pairs`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import paper_bridge
from calm_jax.models import transformer

Array = jax.Array


class OursBridge(nn.Module):
  """The paper's bridge with our options (see the module docstring)."""
  d_model: int
  num_heads: int
  cache_len: int = 512
  recency_bias: bool = False
  recency_max_slope: float = 1.0
  anchor_queries: bool = True
  proj_hidden: int = 0
  gate: bool = False
  source_gate: bool = False
  anchor_gate: bool = False

  @staticmethod
  def check_options(options: Mapping[str, Any], field: str) -> None:
    if not options['recency_max_slope'] > 0:
      raise ValueError(f'{field}.recency_max_slope='
                       f'{options["recency_max_slope"]!r} must be > 0.')
    if options['proj_hidden'] < 0:
      raise ValueError(f'{field}.proj_hidden={options["proj_hidden"]!r} must '
                       "be >= 0 (0: the paper's linear f_proj).")
    if not options['anchor_queries'] and not options['recency_bias']:
      raise ValueError(f'{field}.anchor_queries=False needs {field}.'
                       'recency_bias=True (without either, every head '
                       'averages all earlier positions); set it.')

  @nn.compact
  def __call__(self, anchor_h: Array, aug_h: Array, *,
               mask: Array | None = None, prompt_len: Array | None = None,
               decode: bool | str = False, positions: Array | None = None,
               slots: Array | None = None) -> Array:
    dense = paper_bridge.dense
    h, d = self.num_heads, self.d_model // self.num_heads
    proj = dense(self.d_model, -1, ('aug_embed', 'embed'), 'proj')(aug_h)
    proj = transformer.Norm('rmsnorm', 1e-6, name='kv_norm')(proj)
    if self.proj_hidden:
      hidden = nn.gelu(dense(self.proj_hidden, -1, ('embed', 'mlp'),
                             'mlp_in')(proj))
      proj = proj + dense(self.d_model, -1, ('mlp', 'embed'),
                          'mlp_out')(hidden)
    v = dense((h, d), -1, paper_bridge.HEADS, 'value')(proj)
    if self.source_gate:
      v = v * _gate(h, 'source_gate', proj)[..., None]
    if self.anchor_queries:
      query_in = transformer.Norm('rmsnorm', 1e-6, name='q_norm')(anchor_h)
      q = dense((h, d), -1, paper_bridge.HEADS, 'query')(query_in)
      k = dense((h, d), -1, paper_bridge.HEADS, 'key')(proj)
    else:
      # Zero logits: only the recency bias and the mask shape attention;
      # the cache then holds values only.
      q, k = jnp.zeros(anchor_h.shape[:2] + (h, d), jnp.float32), None
    k, v, mask = paper_bridge.keys_values_mask(
        self, k, v, mask, prompt_len, decode, self.cache_len,
        anchor_h.shape[1], slots)
    if k is None:
      k = jnp.zeros_like(v)
    bias = None
    if self.recency_bias:
      if positions is None:
        raise ValueError('recency_bias needs the anchor token positions.')
      # Slopes start geometric from `recency_max_slope` (a sharp head) to
      # 1/64 of it (a long view) across heads, and are learnt; softplus
      # keeps them positive.
      def slope_init(_, shape):
        i = jnp.arange(shape[0], dtype=jnp.float32)
        return jnp.log(jnp.expm1(self.recency_max_slope * 2.0 ** (
            -6.0 * i / max(shape[0] - 1, 1))))
      slope = jax.nn.softplus(self.param(
          'recency_slope', nn.with_logical_partitioning(
              slope_init, ('heads',)), (h,)))
      # Queries sit at `positions`; so do the keys of the same sequence
      # (packed rows restart them per document), while decoding cache slot
      # s holds position s.
      key_pos = (jnp.arange(k.shape[1], dtype=jnp.float32)[None] if decode
                 else positions.astype(jnp.float32))
      dist = (positions[:, None, :, None].astype(jnp.float32)
              - key_pos[:, None, None, :])
      bias = -slope[:, None, None] * jnp.maximum(dist, 0.0)
    out, probs = transformer.dot_product_attention(q, k, v, mask,
                                                   return_probs=True,
                                                   bias=bias)
    self.sow('intermediates', 'attention', probs)
    if self.anchor_gate:
      gate_in = transformer.Norm('rmsnorm', 1e-6, name='gate_norm')(anchor_h)
      out = out * _gate(h, 'anchor_gate', gate_in)[..., None]
    if not self.gate:
      return dense(self.d_model, (-2, -1), paper_bridge.OUT, 'out',
                   nn.initializers.zeros)(out)
    out = dense(self.d_model, (-2, -1), paper_bridge.OUT, 'out')(out)
    alpha = self.param('gate', nn.with_logical_partitioning(
        nn.initializers.zeros, (None,)), (1,))
    return jnp.tanh(alpha) * out


def _gate(heads: int, name: str, x: Array) -> Array:
  """A sigmoid gate per position and head read off `x`, 1/2 everywhere at
  init (the zero-initialised output keeps the bridge silent either way).
  Called inside a compact module: the layer is its child `name`."""
  return jax.nn.sigmoid(nn.DenseGeneral(
      heads, dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.zeros, ('embed', 'heads')),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros, ('heads',)))(x))
