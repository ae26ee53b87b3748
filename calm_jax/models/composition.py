"""CALM: compose a frozen anchor LM with frozen augmenting LMs.

For every chosen pair (augmenting layer i, anchor layer j) the composition
trains a projection f_proj: D_A -> D_B and a cross-attention f_cross whose
queries come from the anchor stream and whose keys and values come from the
projected augmenting states. The result is added to the anchor's residual
stream right after layer j, and the next anchor layer reads the sum:

    H_B[j] <- H_B[j] + f_cross(f_proj(H_A[i]), H_B[j])

Anchor layer j = -1 (ours) names the anchor's embeddings, the input of its
first block: a small anchor may already compute in block 0 (README, Status).

Parameters live under three kinds of top-level keys: `anchor` and
`aug_<name>` (frozen pretrained models) and `composition` (trainable). The
augmenting forward runs under `stop_gradient`: m_A is read, never trained.

Ours (the paper is silent): the cross-attention is causal, so anchor
position t only reads augmenting positions <= t; the queries and keys are
RMS-normalised; the output projection starts at zero so that the composed
model begins exactly as the anchor. Optionally (`recency_bias`) each head
adds a learnt -slope * (t - s) to its logits: content alone cannot tell the
anchor's own position from earlier ones holding the same token, and at
small scale a bridge without it fails to even relay m_A's next-token
prediction (README, Status). With it, `anchor_queries=False` drops the
content term altogether, for anchors whose states at the bridge are
untrained embeddings (README, The composition); `proj_hidden` makes f_proj
a residual MLP instead of the paper's linear map.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.models import transformer

Array = jax.Array
DecoderConfig = transformer.DecoderConfig


def select_pairs(num_aug_layers: int, num_anchor_layers: int, every_k: int,
                 field: str = 'composition') -> tuple[tuple[int, int], ...]:
  """The paper's rule: every k-th augmenting layer, anchors spread evenly.

  With n = N_A // k, augmenting layers k-1, 2k-1, ... are paired with anchor
  layers at the same relative depth, round((i + 1) * N_B / n) - 1. Indices
  are 0-based and name the output of that block.
  """
  if every_k <= 0:
    raise ValueError(f'{field}.every_k must be positive, got {every_k}.')
  n = num_aug_layers // every_k
  if n == 0:
    raise ValueError(
        f'{field}.every_k={every_k} yields no layer pair: the augmenting '
        f'model has only {num_aug_layers} layers. Use every_k <= '
        f'{num_aug_layers}, or give explicit {field}.pairs.')
  if n > num_anchor_layers:
    raise ValueError(
        f'{field}.every_k={every_k} asks for {n} pairs but the anchor has '
        f'only {num_anchor_layers} layers; increase every_k.')
  return tuple((every_k * (i + 1) - 1,
                int(round((i + 1) * num_anchor_layers / n)) - 1)
               for i in range(n))


def validate_pairs(pairs: Sequence[Sequence[int]], num_aug_layers: int,
                   num_anchor_layers: int, field: str
                   ) -> tuple[tuple[int, int], ...]:
  """Checks explicit (augmenting layer, anchor layer) pairs.

  Anchor layer -1 is the anchor's embeddings (the input of block 0).
  """
  out = []
  for p in pairs:
    if len(p) != 2:
      raise ValueError(f'{field}: each pair is (augmenting_layer, '
                       f'anchor_layer), got {tuple(p)}.')
    a, b = int(p[0]), int(p[1])
    if not 0 <= a < num_aug_layers:
      raise ValueError(
          f'{field}: augmenting layer {a} is out of range; the augmenting '
          f'model has layers 0..{num_aug_layers - 1}.')
    if not -1 <= b < num_anchor_layers:
      raise ValueError(
          f'{field}: anchor layer {b} is out of range; the anchor has '
          f'layers 0..{num_anchor_layers - 1} (-1: its embeddings).')
    out.append((a, b))
  if not out:
    raise ValueError(f'{field} is empty; give at least one pair or use '
                     'every_k.')
  if len(set(out)) != len(out):
    raise ValueError(f'{field} has duplicate pairs: {out}.')
  return tuple(out)


def bridge_options(params: Mapping[str, Any]) -> dict[str, Any]:
  """ComposedLM's bridge arguments, read off trained composition params.

  `params` is the `composition` subtree ({bridge name: params}). Only
  options that change the parameters are recoverable; init-only ones
  (`recency_max_slope`) no longer matter once trained.
  """
  bridge = next(iter(params.values()))
  return dict(cross_heads=bridge['value']['kernel'].shape[1],
              recency_bias='recency_slope' in bridge,
              anchor_queries='query' in bridge,
              proj_hidden=(bridge['mlp_in']['kernel'].shape[-1]
                           if 'mlp_in' in bridge else 0))


@dataclasses.dataclass(frozen=True)
class Augmenting:
  """One augmenting model and the layer pairs that connect it."""
  name: str
  config: DecoderConfig
  pairs: tuple[tuple[int, int], ...]


class CrossAttentionBridge(nn.Module):
  """f_cross(f_proj(H_A), H_B) for one layer pair: [b, t, D_B]."""
  d_model: int
  num_heads: int
  cache_len: int = 512  # Decode-time slots; the anchor's max_len.
  causal: bool = True
  # Ours: a learnt per-head bias -slope_h * (t - s) on the attention logits
  # (ALiBi's form), so a head can read the augmenting state at its own
  # position t. Both models read the same tokens, so positions agree.
  recency_bias: bool = False
  # Initial slope of the sharpest head; the others start geometrically
  # flatter, down to 1/64 of it.
  recency_max_slope: float = 1.0
  # Ours, off by default: with False the attention has no content term
  # (no query or key projections): every head weighs m_A's positions by
  # the recency bias alone, whatever the anchor holds there. For bridges
  # into an anchor's embeddings of tokens it never trained on, whose
  # queries are then per-token noise.
  anchor_queries: bool = True
  # Ours, 0 (the paper's linear f_proj) by default: > 0 adds a residual
  # GELU MLP of that width after the projection, so that a bridge can turn
  # m_A's state into the vector the anchor needs non-linearly.
  proj_hidden: int = 0

  @nn.compact
  def __call__(self, anchor_h: Array, aug_h: Array,
               prompt_len: Array | None = None, decode: bool = False,
               positions: Array | None = None, mask: Array | None = None
               ) -> Array:
    """Which augmenting positions each anchor position reads: `mask`
    [b or 1, 1, t, s] if given (the composition's: causal, per document),
    else s <= t (all s when not `causal`); while decoding, the cache slots
    up to this step. Either way only s < `prompt_len` when it is given."""
    h, d = self.num_heads, self.d_model // self.num_heads
    init = lambda names, fn=nn.initializers.lecun_normal(): (
        nn.with_logical_partitioning(fn, names))
    dense = lambda feats, axis, names, name, **kw: nn.DenseGeneral(
        feats, axis=axis, use_bias=False, dtype=jnp.float32, name=name,
        kernel_init=init(names, **kw))
    # f_proj: D_A -> D_B.
    proj = dense(self.d_model, -1, ('aug_embed', 'embed'), 'proj')(aug_h)
    proj = transformer.Norm('rmsnorm', 1e-6, name='kv_norm')(proj)
    if self.proj_hidden:
      hidden = nn.gelu(dense(self.proj_hidden, -1, ('embed', 'mlp'),
                             'mlp_in')(proj))
      proj = proj + dense(self.d_model, -1, ('mlp', 'embed'),
                          'mlp_out')(hidden)
    v = dense((h, d), -1, ('embed', 'heads', 'head_dim'), 'value')(proj)
    if self.anchor_queries:
      query_in = transformer.Norm('rmsnorm', 1e-6, name='q_norm')(anchor_h)
      q = dense((h, d), -1, ('embed', 'heads', 'head_dim'), 'query')(query_in)
      k = dense((h, d), -1, ('embed', 'heads', 'head_dim'), 'key')(proj)
    else:
      if not self.recency_bias:
        raise ValueError('anchor_queries=False needs recency_bias=True: '
                         'without either, every head averages all earlier '
                         'positions.')
      # Zero logits: only the recency bias and the mask shape attention.
      q, k = jnp.zeros(anchor_h.shape[:2] + (h, d), jnp.float32), None
    if decode:
      # The cached projected states of earlier steps are the keys/values
      # (values only without a content term: its keys would all be zero).
      k, v, mask = transformer.update_cache(self, k, v, self.cache_len)
    elif mask is None:
      t, s = anchor_h.shape[1], aug_h.shape[1]
      mask = jnp.ones((1, 1, t, s), bool)
      if self.causal:
        mask = mask & jnp.tril(jnp.ones((t, s), bool))[None, None]
    if k is None:
      k = jnp.zeros_like(v)
    if prompt_len is not None:
      mask = mask & (jnp.arange(k.shape[1])[None, None, None, :]
                     < prompt_len[:, None, None, None])
    bias = None
    if self.recency_bias:
      if positions is None:
        raise ValueError('recency_bias needs the anchor token positions.')
      # Slopes start geometric from `recency_max_slope` (a sharp head) to
      # 1/64 of it (a long view) across heads, 1, 1/4, 1/16, 1/64 for four
      # by default, and are learnt; softplus keeps them positive.
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
    # Which augmenting positions each anchor position reads, for plots:
    # apply(..., mutable=['intermediates']).
    self.sow('intermediates', 'attention', probs)
    return dense(self.d_model, (-2, -1), ('heads', 'head_dim', 'embed'),
                 'out', fn=nn.initializers.zeros)(out)


class Composition(nn.Module):
  """All trainable bridges; `__call__(j, ...)` is what joins anchor layer j."""
  d_model: int
  num_heads: int
  augmenting: tuple[Augmenting, ...]
  cache_len: int = 512
  recency_bias: bool = False
  recency_max_slope: float = 1.0
  anchor_queries: bool = True
  proj_hidden: int = 0

  def setup(self):
    self.bridges = {
        (a.name, i, j): CrossAttentionBridge(
            self.d_model, self.num_heads, self.cache_len,
            recency_bias=self.recency_bias,
            recency_max_slope=self.recency_max_slope,
            anchor_queries=self.anchor_queries,
            proj_hidden=self.proj_hidden,
            name=f'{a.name}_{i}_{j}')
        for a in self.augmenting for (i, j) in a.pairs}

  def __call__(self, j: int, x: Array, aug: dict[str, dict[int, Array]],
               mask: Array | None, prompt_len: Array | None = None,
               decode: bool = False, positions: Array | None = None
               ) -> Array | None:
    """Sum of the bridges into anchor layer j, or None if there are none."""
    add = None
    for (name, i, jj), bridge in self.bridges.items():
      if jj == j:
        y = bridge(x.astype(jnp.float32), aug[name][i].astype(jnp.float32),
                   prompt_len, decode, positions, mask)
        add = y if add is None else add + y
    return add


class ComposedLM(nn.Module):
  """The anchor with one or more augmenting models bridged into it."""
  anchor: DecoderConfig
  augmenting: tuple[Augmenting, ...]
  cross_heads: int | None = None  # None: the anchor's head count.
  prompt_only: bool = False  # Ablation: m_A reads the prompt only.
  # Ours: a learnt recency bias in every bridge (CrossAttentionBridge).
  recency_bias: bool = False
  recency_max_slope: float = 1.0
  # Ours: content-free bridge attention (CrossAttentionBridge).
  anchor_queries: bool = True
  # Ours: a non-linear f_proj (CrossAttentionBridge).
  proj_hidden: int = 0

  def setup(self):
    self.anchor_lm = transformer.Decoder(self.anchor, name='anchor')
    self.aug_lms = {a.name: transformer.Decoder(a.config, name=f'aug_{a.name}')
                    for a in self.augmenting}
    self.composition = Composition(
        self.anchor.d_model, self.cross_heads or self.anchor.num_heads,
        self.augmenting, self.anchor.max_len,
        recency_bias=self.recency_bias,
        recency_max_slope=self.recency_max_slope,
        anchor_queries=self.anchor_queries,
        proj_hidden=self.proj_hidden)

  def augmenting_states(self, tokens: Array, decode: bool = False,
                        positions: Array | None = None,
                        segment_ids: Array | None = None
                        ) -> dict[str, dict[int, Array]]:
    """Hidden states of every augmenting model at its paired layers."""
    states = {}
    for a in self.augmenting:
      layers = sorted({i for i, _ in a.pairs})
      hs = self.aug_lms[a.name].hidden_states(tokens, layers, decode,
                                              positions, segment_ids)
      states[a.name] = jax.tree_util.tree_map(jax.lax.stop_gradient, hs)
    return states

  def __call__(self, tokens: Array, *, prompt_len: Array | None = None,
               prompt_mask: Array | None = None,
               positions: Array | None = None,
               segment_ids: Array | None = None, decode: bool = False,
               aug_states: dict[str, dict[int, Array]] | None = None
               ) -> Array:
    """Composed logits [b, t, vocab]; float32.

    Packed rows pass `segment_ids` and `positions` (see
    `transformer.Decoder`): neither the models' self-attention nor the
    bridges' cross-attention crosses a document boundary. `prompt_mask`
    [b, t] (1 at each document's BOS and prompt) is packed rows' form of
    `prompt_len`, for the prompt-only ablation.

    `aug_states` ({name: {layer: [b, t, D_A]}}) replaces running the
    augmenting models, e.g. with states cached on disk: they are frozen, so
    their states for a fixed dataset never change.
    """
    if self.prompt_only and prompt_len is None and prompt_mask is None:
      raise ValueError('composition.prompt_only needs the batch to carry '
                       'prompt_len (or prompt_mask in packed rows).')
    if aug_states is None:
      aug = self.augmenting_states(tokens, decode, positions, segment_ids)
    else:
      aug = jax.tree_util.tree_map(jax.lax.stop_gradient, aug_states)
    anchor = self.anchor_lm
    positions = anchor.positions(tokens, decode, positions)
    mask = plen = None
    if decode:
      plen = prompt_len if self.prompt_only else None
    else:
      # Causal, within each document, and (prompt only) the prompt's.
      mask = transformer.causal_mask(tokens.shape[1], segment_ids)
      if self.prompt_only:
        if prompt_mask is None:
          prompt_mask = (jnp.arange(tokens.shape[1])[None, :]
                         < prompt_len[:, None])
        mask = mask & prompt_mask.astype(bool)[:, None, None, :]
    x = anchor.embed(tokens, positions)
    lowest = min(j for a in self.augmenting for _, j in a.pairs)
    for j in range(-1, self.anchor.num_layers):
      if j >= 0:
        x = anchor.block(j, x, positions, decode, segment_ids)
      if j == lowest:
        # Nothing below the lowest composed layer depends on the bridges;
        # this keeps even a whole-tree gradient from running down there.
        x = jax.lax.stop_gradient(x)
      add = self.composition(j, x, aug, mask, plen, decode, positions)
      if add is not None:
        if self.is_mutable_collection('bridge_writes'):
          # What the bridges write at each position, [b, t], for the
          # training loop to penalise (composition.write_penalty):
          # apply(..., mutable=['bridge_writes']).
          self.sow('bridge_writes', f'sq_norm_{j}',
                   jnp.sum(jnp.square(add.astype(jnp.float32)), -1))
        x = x + add.astype(x.dtype)
    return anchor.head(x)
