"""CALM: compose a frozen anchor LM with frozen augmenting LMs.

For every chosen pair (augmenting layer i, anchor layer j) the composition
trains a projection f_proj: D_A -> D_B and a cross-attention f_cross whose
queries come from the anchor stream and whose keys and values come from the
projected augmenting states. The result is added to the anchor's residual
stream right after layer j, and the next anchor layer reads the sum:

    H_B[j] <- H_B[j] + f_cross(f_proj(H_A[i]), H_B[j])

`paper_bridge.PaperBridge` is exactly that, on one screen, with the choices
the paper leaves open (ours): a causal cross-attention (anchor position t
reads augmenting positions s <= t, within its own document of a packed
row), RMS-normalised queries and projected keys, and an output projection
that starts at zero, so the composed model begins exactly as the anchor.
Bridges are chosen by name
(`BridgeConfig.name`, config field `composition.bridge`): 'paper', or our
variants in `calm_jax/models/bridges.py`. Anchor layer j = -1 (ours) names
the anchor's embeddings, the input of its first block.

Parameters live under three kinds of top-level keys: `anchor` and
`aug_<name>` (frozen pretrained models) and `composition` (trainable). The
augmenting forward runs under `stop_gradient`: m_A is read, never trained.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import sharding
from calm_jax.models import paper_bridge
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


@dataclasses.dataclass(frozen=True)
class Augmenting:
  """One augmenting model and the layer pairs that connect it."""
  name: str
  config: DecoderConfig
  pairs: tuple[tuple[int, int], ...]

  @property
  def layers(self) -> list[int]:
    """The augmenting layers some pair reads, in order."""
    return sorted({i for i, _ in self.pairs})


# ----------------------------------------------------------------- bridges

# The paper's bridge and the helpers every bridge shares live in
# paper_bridge.py (one screen); these names stay importable from here.
PaperBridge = paper_bridge.PaperBridge
dense = paper_bridge.dense
keys_values_mask = paper_bridge.keys_values_mask
HEADS, OUT = paper_bridge.HEADS, paper_bridge.OUT


# Bridge name -> 'module:Class' (imported when used, big_vision style). A
# bridge's options are its module fields past d_model, num_heads and
# cache_len, with their defaults.
BRIDGES = {
    'paper': 'calm_jax.models.paper_bridge:PaperBridge',
    'ours': 'calm_jax.models.bridges:OursBridge',
}
_BASE_FIELDS = ('d_model', 'num_heads', 'cache_len', 'parent', 'name')


def bridge_class(name: str, field: str = 'composition.bridge') -> type:
  if name not in BRIDGES:
    raise ValueError(f'{field}={name!r} is not a bridge; choose one of '
                     f'{sorted(BRIDGES)}.')
  module, cls = BRIDGES[name].split(':')
  return getattr(importlib.import_module(module), cls)


def bridge_defaults(name: str, field: str = 'composition.bridge'
                    ) -> dict[str, Any]:
  """The options of bridge `name` with their defaults ({} for 'paper');
  an unknown name is an error naming `field`."""
  return {f.name: f.default
          for f in dataclasses.fields(bridge_class(name, field))
          if f.name not in _BASE_FIELDS}


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
  """Which bridge joins each layer pair, and its options (hashable)."""
  name: str = 'paper'
  cross_heads: int = 0  # 0: the anchor's head count (the paper's).
  options: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def make(cls, name: str = 'paper', cross_heads: int = 0,
           options: Mapping[str, Any] | None = None,
           field: str = 'composition',
           name_field: str = 'composition.bridge') -> 'BridgeConfig':
    """A validated config; errors name `field`.<option>, or `name_field`
    for an unknown bridge."""
    defaults = bridge_defaults(name, name_field)
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
      raise ValueError(f'{field}: bridge {name!r} has no options {unknown}; '
                       f'its options are {sorted(defaults)}.')
    for key, value in options.items():
      want = type(defaults[key])
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            if want is float else isinstance(value, want))
      if not ok:
        raise ValueError(f'{field}.{key}={value!r} must be a '
                         f'{want.__name__}, like its default '
                         f'{defaults[key]!r}.')
    if not isinstance(cross_heads, int) or cross_heads < 0:
      # A sibling of the bridge's name: composition.cross_heads.
      where = name_field.rpartition('.')[0]
      raise ValueError(f'{where + "." if where else ""}cross_heads='
                       f"{cross_heads!r} must be an int >= 0 (0: the "
                       "anchor's head count).")
    check = getattr(bridge_class(name), 'check_options', None)
    if check is not None:
      check({**defaults, **options}, field)
    return cls(name, cross_heads, tuple(sorted(options.items())))

  def build(self, d_model: int, num_heads: int, cache_len: int, name: str
            ) -> nn.Module:
    return bridge_class(self.name)(d_model, self.cross_heads or num_heads,
                                   cache_len, name=name, **dict(self.options))

  def to_dict(self) -> dict[str, Any]:
    return {'name': self.name, 'cross_heads': self.cross_heads,
            'options': dict(self.options)}


def bridge_config_of(params: Mapping[str, Any]) -> BridgeConfig:
  """The bridge of trained composition params that predate composition.json
  (read off the parameter names and shapes; init-only options such as
  `recency_max_slope` no longer matter once trained)."""
  bridge = next(iter(params.values()))
  heads = bridge['value']['kernel'].shape[1]
  options = dict(recency_bias='recency_slope' in bridge,
                 anchor_queries='query' in bridge,
                 proj_hidden=(bridge['mlp_in']['kernel'].shape[-1]
                              if 'mlp_in' in bridge else 0),
                 gate='gate' in bridge, source_gate='source_gate' in bridge,
                 anchor_gate='anchor_gate' in bridge)
  if options == dict(recency_bias=False, anchor_queries=True, proj_hidden=0,
                     gate=False, source_gate=False, anchor_gate=False):
    return BridgeConfig('paper', heads)
  return BridgeConfig.make('ours', heads, options)


# ------------------------------------------------------------ composition


def constrain_batch(x: Array) -> Array:
  """`x` [b, ...] split over the data-parallel mesh axes, the rest whole.

  At a bridge's inputs and output this pins the layout GSPMD would
  otherwise have to infer through the cross-attention (and could resolve
  by gathering the batch). Only under a mesh context (`jax.set_mesh`, as
  the training loop runs its step), and only when the axes divide the
  batch; elsewhere (decoding, a plain `apply`) `x` is returned as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in axes)
  if not axes or size == 1 or x.shape[0] % size:
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def _of(x: Any, name: str) -> Any:
  """x[name] for a per-augmenting-model dict, else x."""
  return x[name] if isinstance(x, Mapping) else x


class Composition(nn.Module):
  """All trainable bridges; `__call__(j, ...)` is what joins anchor layer j."""
  d_model: int
  num_heads: int
  augmenting: tuple[Augmenting, ...]
  bridge: BridgeConfig = BridgeConfig()
  cache_len: int = 512
  # Aligned streams (ALIGN_CHARS): a bridge's decode cache is indexed by
  # its augmenting model's positions, up to that model's max_len.
  aligned: bool = False

  def setup(self):
    self.bridges = {
        (a.name, i, j): self.bridge.build(
            self.d_model, self.num_heads,
            a.config.max_len if self.aligned else self.cache_len,
            f'{a.name}_{i}_{j}')
        for a in self.augmenting for (i, j) in a.pairs}

  def __call__(self, j: int, x: Array, aug: dict[str, dict[int, Array]],
               mask: Array | Mapping[str, Array] | None,
               prompt_len: Array | None = None, decode: bool | str = False,
               positions: Array | None = None,
               slots: Mapping[str, Array] | None = None) -> Array | None:
    """Sum of the bridges into anchor layer j, or None if there are none.

    `mask` may be one per augmenting model ({name: mask}, aligned streams);
    `slots` ({name: [b, s]}) are where aligned decoding caches their states.
    """
    add = None
    for (name, i, jj), bridge in self.bridges.items():
      if jj == j:
        y = bridge(constrain_batch(x.astype(jnp.float32)),
                   constrain_batch(aug[name][i].astype(jnp.float32)),
                   mask=_of(mask, name), prompt_len=prompt_len,
                   decode=decode, positions=positions,
                   slots=None if slots is None else slots[name])
        y = constrain_batch(y)
        add = y if add is None else add + y
    return add


# `ComposedLM.align`: every model reads the anchor's token ids ('none'), or
# each augmenting model reads the text in its own tokenizer, aligned to the
# anchor's tokens by characters ('chars', calm_jax/data/align.py).
ALIGN_NONE, ALIGN_CHARS = 'none', 'chars'


def aligned_mask(counts: Array, length: int,
                 segment_ids: Array | None = None,
                 aug_segment_ids: Array | None = None,
                 aug_prompt_mask: Array | None = None) -> Array:
  """[b, 1, t, length]: anchor position t reads augmenting position s iff
  s < counts[b, t] (token s is known by the end of anchor token t), within
  its own document, and (prompt only) s lies in the prompt."""
  mask = (jnp.arange(length)[None, None, None, :]
          < counts[:, None, :, None])
  if segment_ids is not None and aug_segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None]
                   == aug_segment_ids[:, None, None, :])
  if aug_prompt_mask is not None:
    mask = mask & aug_prompt_mask.astype(bool)[:, None, None, :]
  return mask


class ComposedLM(nn.Module):
  """The anchor with one or more augmenting models bridged into it."""
  anchor: DecoderConfig
  augmenting: tuple[Augmenting, ...]
  bridge: BridgeConfig = BridgeConfig()
  prompt_only: bool = False  # Ablation: m_A reads the prompt only.
  align: str = ALIGN_NONE  # ALIGN_CHARS: m_A reads its own token stream.

  def setup(self):
    if self.align not in (ALIGN_NONE, ALIGN_CHARS):
      raise ValueError(f'composition.align={self.align!r} must be '
                       f'{ALIGN_NONE!r} or {ALIGN_CHARS!r}.')
    if self.aligned and dict(self.bridge.options).get('recency_bias'):
      raise ValueError(
          'composition.ours.recency_bias measures distances in one token '
          "stream; with composition.align='chars' the streams differ. Set "
          'composition.ours.recency_bias=False.')
    self.anchor_lm = transformer.Decoder(self.anchor, name='anchor')
    self.aug_lms = {a.name: transformer.Decoder(a.config, name=f'aug_{a.name}')
                    for a in self.augmenting}
    self.composition = Composition(
        self.anchor.d_model, self.anchor.num_heads, self.augmenting,
        self.bridge, self.anchor.max_len, self.aligned)

  @property
  def aligned(self) -> bool:
    return self.align == ALIGN_CHARS

  def augmenting_states(self, tokens: Array, decode: bool = False,
                        positions: Array | None = None,
                        segment_ids: Array | None = None
                        ) -> dict[str, dict[int, Array]]:
    """Hidden states of every augmenting model at its paired layers."""
    states = {}
    for a in self.augmenting:
      layers = a.layers
      hs = self.aug_lms[a.name].hidden_states(tokens, layers, decode,
                                              positions, segment_ids)
      states[a.name] = jax.tree_util.tree_map(jax.lax.stop_gradient, hs)
    return states

  def __call__(self, tokens: Array, *, prompt_len: Array | None = None,
               prompt_mask: Array | None = None,
               positions: Array | None = None,
               segment_ids: Array | None = None, decode: bool | str = False,
               aug_states: dict[str, dict[int, Array]] | None = None,
               aug_inputs: Mapping[str, Mapping[str, Array]] | None = None
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

    Aligned streams (`align='chars'`) pass `aug_inputs`: per augmenting
    model {'tokens': [b, s], 'counts': [b, t]} and, as the rows need them,
    'positions', 'segment_ids' and (prompt only) 'prompt_mask' [b, s].
    Anchor position t reads augmenting positions s < counts[b, t]. With
    decode=SLOTS (aligned decoding, `calm_jax.aligned_decoding`) `tokens`
    and `positions` are this call's anchor tokens and their positions,
    and each model's 'positions' are the slots its new tokens take (>= its
    max_len: padding); 'counts' then count cache slots.
    """
    if self.aligned:
      return self._aligned(tokens, prompt_mask=prompt_mask,
                           prompt_len=prompt_len, positions=positions,
                           segment_ids=segment_ids, decode=decode,
                           aug_inputs=aug_inputs)
    if aug_inputs is not None:
      raise ValueError("aug_inputs are read with composition.align='chars' "
                       'only.')
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
    return self._anchor(tokens, positions, segment_ids, decode, aug, mask,
                        plen)

  def _aligned(self, tokens: Array, *, prompt_mask: Array | None,
               prompt_len: Array | None, positions: Array | None,
               segment_ids: Array | None, decode: bool | str,
               aug_inputs: Mapping[str, Mapping[str, Array]] | None
               ) -> Array:
    """`__call__` with each augmenting model on its own token stream."""
    del prompt_mask, prompt_len  # Prompt only: the streams' prompt masks.
    if decode and decode != transformer.SLOTS:
      raise ValueError("composition.align='chars' decodes with "
                       'calm_jax.aligned_decoding (decode=SLOTS).')
    names = [a.name for a in self.augmenting]
    if aug_inputs is None or set(aug_inputs) != set(names):
      raise ValueError(
          "composition.align='chars' needs aug_inputs for augmenting models "
          f'{names}, got {sorted(aug_inputs or {})}; build the batches '
          'with the aligned data pipeline.')
    aug, masks, slots = {}, {}, {}
    for a in self.augmenting:
      inp = aug_inputs[a.name]
      layers = a.layers
      hs = self.aug_lms[a.name].hidden_states(
          inp['tokens'], layers, decode, inp.get('positions'),
          None if decode else inp.get('segment_ids'))
      aug[a.name] = jax.tree_util.tree_map(jax.lax.stop_gradient, hs)
      length = a.config.max_len if decode else inp['tokens'].shape[1]
      if self.prompt_only and not decode and 'prompt_mask' not in inp:
        raise ValueError('composition.prompt_only needs each aligned stream '
                         "to carry its 'prompt_mask'.")
      masks[a.name] = aligned_mask(
          inp['counts'], length, None if decode else segment_ids,
          inp.get('segment_ids'),
          inp.get('prompt_mask') if self.prompt_only and not decode
          else None)
      if decode:
        slots[a.name] = inp['positions']
    positions = self.anchor_lm.positions(tokens, decode, positions)
    return self._anchor(tokens, positions, None if decode else segment_ids,
                        decode, aug, masks, None, slots if decode else None)

  def _anchor(self, tokens: Array, positions: Array,
              segment_ids: Array | None, decode: bool | str,
              aug: dict[str, dict[int, Array]], mask: Any,
              plen: Array | None, slots: Any = None) -> Array:
    """The anchor's forward with the bridges' writes added."""
    anchor = self.anchor_lm
    x = anchor.embed(tokens, positions)
    lowest = min(j for a in self.augmenting for _, j in a.pairs)
    for j in range(-1, self.anchor.num_layers):
      if j >= 0:
        x = anchor.block(j, x, positions, decode, segment_ids)
      if j == lowest:
        # Nothing below the lowest composed layer depends on the bridges;
        # this keeps even a whole-tree gradient from running down there.
        x = jax.lax.stop_gradient(x)
      add = self.composition(j, x, aug, mask, plen, decode, positions, slots)
      if add is not None:
        # The squared norm of what the bridges write at each position,
        # [b, t] (composition.write_penalty reads it): apply(...,
        # mutable=['intermediates']).
        self.sow('intermediates', f'write_sq_{j}',
                 jnp.sum(jnp.square(add.astype(jnp.float32)), -1))
        x = x + add.astype(x.dtype)
    return anchor.head(x)
