"""Load Hugging Face-layout checkpoints (config.json + *.safetensors).

Supported families: the Llama family (Llama 2/3 with GQA and Llama-3 RoPE
scaling; Mistral and Qwen2, which differ only in config, sliding windows
included), Gemma 1, Gemma 2, Gemma 3 (the text model, also out of a
multimodal `gemma3` checkpoint) and GPT-2. Weights are read with
`safetensors` (numpy; no torch or transformers at run time), one tensor at a
time: each is transposed into this library's kernel layout, cast to the
requested dtype and placed (on the mesh, when shardings are given) before
the next is read, so no second copy of the model is ever held.

    model, params = calm_jax.load_pretrained('/ckpts/llama', dtype='bfloat16')
    logits = model.apply({'params': params}, tokens)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
# Registers bfloat16 with numpy: safetensors' numpy reader needs it for the
# bf16 tensors most real checkpoints hold.
import ml_dtypes  # noqa: F401  pylint: disable=unused-import
import numpy as np

from calm_jax.models import transformer

Params = dict[str, Any]
# (checkpoint tensor name, our parameter path 'a/b/c', value).
Converted = Iterator[tuple[str, str, np.ndarray]]


# ------------------------------------------------------------------ config

# transformers' defaults for the fields read below. A config.json may leave
# any of them out (multimodal Gemma 3 writes only the non-default ones into
# `text_config`), and transformers then uses these values; so must we.
_LLAMA_DEFAULTS = dict(
    hidden_act='silu', max_position_embeddings=2048, rms_norm_eps=1e-6,
    rope_theta=10_000.0, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False)
_GEMMA2_DEFAULTS = dict(
    vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
    head_dim=256, hidden_activation='gelu_pytorch_tanh',
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10_000.0,
    query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
DEFAULTS: dict[str, dict[str, Any]] = {
    'llama': _LLAMA_DEFAULTS,
    'mistral': dict(_LLAMA_DEFAULTS, max_position_embeddings=4096 * 32,
                    num_key_value_heads=8, sliding_window=4096),
    'qwen2': dict(_LLAMA_DEFAULTS, vocab_size=151_936, num_key_value_heads=32,
                  max_position_embeddings=32_768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    'gemma': dict(hidden_act='gelu_pytorch_tanh', head_dim=256,
                  num_key_value_heads=16,
                  max_position_embeddings=8192, rms_norm_eps=1e-6,
                  rope_theta=10_000.0),
    'gemma2': _GEMMA2_DEFAULTS,
    'gemma3_text': dict(
        _GEMMA2_DEFAULTS, vocab_size=262_208, max_position_embeddings=131_072,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        sliding_window_pattern=6, final_logit_softcapping=None,
        attn_logit_softcapping=None),
    'gpt2': dict(vocab_size=50_257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12, activation_function='gelu_new',
                 layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False,
                 tie_word_embeddings=True),
}
# The tanh approximation of GELU under its transformers names.
_TANH_GELU = ('gelu_pytorch_tanh', 'gelu_new')


class _Config(dict):
  """config.json over transformers' defaults; errors name the file."""

  def __init__(self, raw: dict[str, Any], family: str, file: str):
    super().__init__({**DEFAULTS.get(family, {}), **raw})
    self.file = file

  def need(self, key: str) -> Any:
    if self.get(key) is None:
      raise ValueError(f'{self.file}: {key!r} is missing; a checkpoint of '
                       f"model_type={self.get('model_type')!r} needs it.")
    return self[key]

  def fail(self, msg: str):
    raise ValueError(f'{self.file}: {msg}')


def _rope_fields(c: _Config, params: dict[str, Any],
                 kinds: tuple[str, ...]) -> dict[str, Any]:
  """DecoderConfig RoPE fields from one transformers rope dict."""
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in kinds:
    c.fail(f'RoPE type {kind!r} is not supported for '
           f"model_type={c.get('model_type')!r}; supported: {list(kinds)}.")
  if params.get('partial_rotary_factor', 1.0) != 1.0:
    c.fail('partial_rotary_factor != 1 (RoPE on part of each head) is not '
           'supported.')
  out = dict(rope_theta=float(params.get('rope_theta') or c['rope_theta']))
  if kind == 'linear':
    out.update(rope_scaling='linear', rope_factor=params['factor'])
  elif kind == 'llama3':
    out.update(rope_scaling='llama3', rope_factor=params['factor'],
               rope_low_freq_factor=params['low_freq_factor'],
               rope_high_freq_factor=params['high_freq_factor'],
               rope_original_max_len=params[
                   'original_max_position_embeddings'])
  return out


def _global_rope(c: _Config) -> dict[str, Any]:
  """transformers >= 5 writes `rope_parameters` (theta inside, per layer
  type for Gemma 3); older versions `rope_scaling` beside `rope_theta`."""
  params = c.get('rope_parameters') or c.get('rope_scaling') or {}
  return params.get('full_attention', params)


def _sliding(c: _Config, types: list[str] | None, window: int | None
             ) -> dict[str, Any]:
  """sliding_window / sliding_layers from transformers' `layer_types`."""
  types = types or []
  unknown = sorted(set(types) - {'sliding_attention', 'full_attention'})
  if unknown:
    c.fail(f'layer_types {unknown} are not supported; only '
           "'sliding_attention' and 'full_attention' are.")
  layers = tuple(i for i, t in enumerate(types) if t == 'sliding_attention')
  if not window or not layers:  # transformers: no window, no sliding.
    return dict(sliding_window=0, sliding_layers=())
  return dict(sliding_window=int(window), sliding_layers=layers)


def _llama(c: _Config) -> dict[str, Any]:
  """Llama, Mistral and Qwen2: one architecture, configured differently."""
  family = c['model_type']
  n, heads = c.need('num_hidden_layers'), c.need('num_attention_heads')
  if c['hidden_act'] != 'silu':
    c.fail(f"hidden_act={c['hidden_act']!r}: the Llama family here uses "
           "'silu'.")
  out = dict(
      vocab_size=c.need('vocab_size'), d_model=c.need('hidden_size'),
      num_layers=n, num_heads=heads,
      num_kv_heads=c.get('num_key_value_heads') or heads,
      head_dim=c.get('head_dim') or c['hidden_size'] // heads,
      d_ff=c.need('intermediate_size'),
      max_len=c['max_position_embeddings'], norm='rmsnorm',
      norm_eps=c['rms_norm_eps'], position='rope', mlp='gated_silu',
      tie_embeddings=c['tie_word_embeddings'],
      **_rope_fields(c, _global_rope(c), ('default', 'linear', 'llama3')))
  if family == 'qwen2':  # Biases on q/k/v only, whatever the config says.
    out['qkv_bias'] = True
  elif c['attention_bias'] and c['mlp_bias']:
    out['use_bias'] = True
  elif c['attention_bias'] or c['mlp_bias']:
    c.fail(f"attention_bias={c['attention_bias']} with mlp_bias="
           f"{c['mlp_bias']} is not supported; biases on every projection "
           '(both true) or none are.')
  if family == 'mistral':  # One window for every layer.
    out.update(_sliding(c, ['sliding_attention'] * n, c.get('sliding_window')))
  elif family == 'qwen2':  # Sliding from layer `max_window_layers` on.
    window = c.get('sliding_window') if c['use_sliding_window'] else None
    types = c.get('layer_types') or [
        'sliding_attention' if i >= c['max_window_layers'] else
        'full_attention' for i in range(n)]
    out.update(_sliding(c, types, window))
  return out


def _gemma(c: _Config) -> dict[str, Any]:
  """Gemma 1: Llama with GeGLU, scaled embeddings and (1 + scale) norms."""
  act = c.get('hidden_act') or c.get('hidden_activation')
  # transformers reads Gemma 1's legacy 'gelu' as the tanh approximation.
  if act not in _TANH_GELU + ('gelu',):
    c.fail(f'hidden_act={act!r} is not a tanh-approximated GELU; Gemma 1 '
           "uses 'gelu_pytorch_tanh'.")
  if c.get('attention_bias'):
    c.fail('attention_bias=true is not supported for Gemma.')
  if c.get('use_bidirectional_attention'):
    c.fail('use_bidirectional_attention=true (an encoder such as '
           'EmbeddingGemma) is not a decoder LM; it is not supported.')
  out = _llama(_Config(dict(c, hidden_act='silu'), 'llama', c.file))
  out.update(mlp='gated_gelu', scale_embeddings=True, norm_scale_offset=1.0,
             tie_embeddings=True)
  return out


def _gemma2(c: _Config) -> dict[str, Any]:
  """Gemma 2 and Gemma 3 text: sandwich norms, soft-caps, local layers."""
  if c['hidden_activation'] not in _TANH_GELU:
    c.fail(f"hidden_activation={c['hidden_activation']!r} is not a tanh-"
           "approximated GELU; Gemma 2/3 use 'gelu_pytorch_tanh'.")
  gemma3 = c['model_type'] == 'gemma3_text'
  rope = c.get('rope_parameters') or {}
  # Gemma 3 rope: per layer type (transformers >= 5), or a global
  # `rope_scaling` plus `rope_local_base_freq` for the local layers.
  local = rope.get('sliding_attention', {})
  glob = _global_rope(c)
  n = c.need('num_hidden_layers')
  pattern = c.get('sliding_window_pattern') or 2
  types = c.get('layer_types') or [  # Before `layer_types` existed.
      'sliding_attention' if (i + 1) % pattern else 'full_attention'
      for i in range(n)]
  out = _gemma(_Config(dict(c, rope_parameters=glob, rope_scaling=None,
                            hidden_act='gelu_pytorch_tanh'), 'gemma', c.file))
  out.update(
      post_norms=True, attn_logit_softcap=c['attn_logit_softcapping'],
      logit_softcap=c['final_logit_softcapping'],
      query_scale=c['query_pre_attn_scalar'] ** -0.5, qk_norm=gemma3,
      local_rope_theta=(local.get('rope_theta') or
                        c.get('rope_local_base_freq')),
      **_sliding(c, types, c['sliding_window']))
  if local.get('rope_type', 'default') != 'default':
    c.fail(f"sliding-attention RoPE type {local['rope_type']!r} is not "
           "supported; only 'default' is.")
  return out


def _gemma3(c: _Config) -> dict[str, Any]:
  """The text model of a multimodal Gemma 3 checkpoint."""
  text = _Config(dict(c.get('text_config') or {}, model_type='gemma3_text'),
                 'gemma3_text', c.file)
  return _gemma2(text)


def _gpt2(c: _Config) -> dict[str, Any]:
  act = c['activation_function']
  if act not in _TANH_GELU:
    c.fail(f"activation_function={act!r} is not supported for GPT-2; "
           "'gelu_new' is.")
  if not c['scale_attn_weights'] or c['scale_attn_by_inverse_layer_idx']:
    c.fail('scale_attn_weights=false or scale_attn_by_inverse_layer_idx='
           'true is not supported; GPT-2 here scales by head_dim ** -0.5.')
  d = c['n_embd']
  return dict(
      vocab_size=c['vocab_size'], d_model=d, num_layers=c['n_layer'],
      num_heads=c['n_head'], d_ff=c.get('n_inner') or 4 * d,
      max_len=c['n_positions'], norm='layernorm',
      norm_eps=c['layer_norm_epsilon'], position='learned', mlp='gelu',
      tie_embeddings=c['tie_word_embeddings'], use_bias=True)


FAMILIES: dict[str, Callable[[_Config], dict[str, Any]]] = {
    'llama': _llama, 'mistral': _llama, 'qwen2': _llama, 'gemma': _gemma,
    'gemma2': _gemma2, 'gemma3_text': _gemma2, 'gemma3': _gemma3,
    'gpt2': _gpt2,
}


def read_config(path: str | os.PathLike
                ) -> tuple[str, transformer.DecoderConfig]:
  """(model_type, DecoderConfig) from a checkpoint's config.json."""
  file = os.path.join(os.fspath(path), 'config.json')
  try:
    with open(file) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{file} is missing or not JSON ({e}); a Hugging Face '
                     'checkpoint directory needs config.json.') from e
  family = raw.get('model_type')
  if family not in FAMILIES:
    raise ValueError(f'{file}: model_type={family!r} is not supported; '
                     f'supported: {sorted(FAMILIES)}.')
  fields = FAMILIES[family](_Config(raw, family, file))
  return family, transformer.DecoderConfig.from_dict(fields, file)


# ----------------------------------------------------------------- weights


class _Lazy:
  """A checkpoint tensor that is read only where it is asked for.

  The converters below transpose, reshape and index tensors as if they were
  numpy arrays; on a `_Lazy` those operations only compose index maps, and
  `read(index)` (a tuple of slices in the converted layout) reads just the
  source region that index needs (`get_slice` of safetensors). So a process
  placing a sharded parameter reads its own shards' bytes, not the whole
  tensor (`jax.make_array_from_callback`).
  """

  def __init__(self, shape: tuple[int, ...], read: Callable[[tuple], Any]):
    self.shape = tuple(int(n) for n in shape)
    self._read = read

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def read(self, index: tuple = ()) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (self.ndim - len(index))
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
    return np.asarray(self._read(index))

  def __array__(self, dtype=None, copy=None):
    out = self.read()
    return out if dtype is None else out.astype(dtype)

  @property
  def T(self) -> '_Lazy':  # pylint: disable=invalid-name
    if self.ndim != 2:
      raise ValueError(f'.T of a {self.ndim}-d tensor')
    return _Lazy(self.shape[::-1], lambda i: self.read(i[::-1]).T)

  def reshape(self, *shape) -> '_Lazy':
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(
        shape[0], (tuple, list)) else tuple(shape)
    if math.prod(shape) != math.prod(self.shape):
      raise ValueError(f'cannot reshape {self.shape} into {shape}')
    groups = _split_groups(self.shape, shape)
    if groups is None:  # Not a pure split of dims: read whole, then index.
      return _Lazy(shape, lambda i: np.asarray(self.read()).reshape(shape)[i])

    def read(index):
      src, local, block_shape = [], [], []
      for dim, (lo, hi) in enumerate(groups):
        parts, dims = index[lo:hi], shape[lo:hi]
        inner = math.prod(dims[1:])
        if not dims:  # A size-1 source dim the target drops.
          src.append(slice(0, 1))
        elif parts[0].step == 1 and all(
            p == slice(0, n, 1) for p, n in zip(parts[1:], dims[1:])):
          # Whole trailing dims: a contiguous run of the source dim.
          src.append(slice(parts[0].start * inner, parts[0].stop * inner))
          block_shape += [parts[0].stop - parts[0].start, *dims[1:]]
          local += [slice(None)] * len(dims)
        else:
          src.append(slice(0, self.shape[dim]))
          block_shape += list(dims)
          local += list(parts)
      return self.read(tuple(src)).reshape(block_shape)[tuple(local)]

    return _Lazy(shape, read)

  def __getitem__(self, key) -> '_Lazy':
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (self.ndim - len(key))
    base = [slice(*k.indices(n)) if isinstance(k, slice) else k
            for k, n in zip(key, self.shape)]
    shape = [len(range(*b.indices(n))) if isinstance(b, slice) else None
             for b, n in zip(base, self.shape)]

    def read(index):
      it = iter(index)
      src = []
      for b in base:
        if isinstance(b, int):
          src.append(slice(b, b + 1))
        else:
          i = next(it)
          src.append(slice(b.start + i.start * b.step,
                           b.start + i.stop * b.step, b.step * i.step))
      out = self.read(tuple(src))
      return out[tuple(0 if isinstance(b, int) else slice(None)
                       for b in base)]

    return _Lazy(tuple(n for n in shape if n is not None), read)


def _split_groups(src: tuple[int, ...], dst: tuple[int, ...]
                  ) -> list[tuple[int, int]] | None:
  """For each source dim, the run [lo, hi) of target dims it splits into
  (empty for a size-1 dim the target drops); None when the reshape is not
  such a split (the caller then reads the whole tensor)."""
  groups, j = [], 0
  for n in src:
    lo, prod = j, 1
    while prod < n and j < len(dst):
      prod *= dst[j]
      j += 1
    if prod != n:
      return None
    groups.append((lo, j))
  return groups if j == len(dst) else None


def _tensors(path: str) -> Iterator[tuple[str, _Lazy]]:
  """Every tensor of the checkpoint, one at a time (index or single file),
  each read lazily (`_Lazy`)."""
  from safetensors.numpy import safe_open  # Deferred: optional dependency.
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif os.path.exists(os.path.join(path, 'model.safetensors')):
    # Some repositories also hold the same weights in another layout
    # (Mistral's consolidated.safetensors); only the transformers file counts.
    files = ['model.safetensors']
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise ValueError(f'{path} holds no *.safetensors files.')
  for name in files:
    with safe_open(os.path.join(path, name), framework='numpy') as f:
      for key in f.keys():
        part = f.get_slice(key)
        yield key, _Lazy(part.get_shape(), lambda i, part=part: part[i])


# Where the text model's tensors live: Llama-style causal LMs under
# `model.`, multimodal Gemma 3 under either of its two historical prefixes.
_PREFIXES = ('model.language_model.', 'language_model.model.',
             'language_model.', 'model.')
# Multimodal Gemma 3: the vision tower and projector are not loaded.
_SKIPPED = ('vision_tower.', 'multi_modal_projector.', 'model.vision_tower.',
            'model.multi_modal_projector.')


def _fit(key: str, fn: Callable[[np.ndarray], Any], w: np.ndarray) -> Any:
  """fn(w), with a reshape that the config's sizes rule out named."""
  try:
    return fn(w)
  except ValueError as e:
    raise ValueError(f'tensor {key!r} of shape {w.shape} does not fit the '
                     f'sizes in config.json ({e}).') from e


def _llama_weights(cfg: transformer.DecoderConfig,
                   tensors: Iterator[tuple[str, np.ndarray]]) -> Converted:
  h, kv, d, dh = cfg.num_heads, cfg.kv_heads, cfg.d_model, cfg.dim_per_head
  same = lambda w: w
  table = {
      'input_layernorm.weight': ('attn_norm/scale', same),
      # Gemma 2/3 norm both sides of each branch; Llama only before.
      'post_attention_layernorm.weight': (
          'post_attn_norm/scale' if cfg.post_norms else 'mlp_norm/scale', same),
      'pre_feedforward_layernorm.weight': ('mlp_norm/scale', same),
      'post_feedforward_layernorm.weight': ('post_mlp_norm/scale', same),
      'self_attn.q_norm.weight': ('attn/query_norm/scale', same),
      'self_attn.k_norm.weight': ('attn/key_norm/scale', same),
      # torch Linear weights are [out, in]; our kernels [in, ...out].
      'self_attn.q_proj.weight': ('attn/query/kernel',
                                  lambda w: w.T.reshape(d, h, dh)),
      'self_attn.k_proj.weight': ('attn/key/kernel',
                                  lambda w: w.T.reshape(d, kv, dh)),
      'self_attn.v_proj.weight': ('attn/value/kernel',
                                  lambda w: w.T.reshape(d, kv, dh)),
      'self_attn.q_proj.bias': ('attn/query/bias', lambda w: w.reshape(h, dh)),
      'self_attn.k_proj.bias': ('attn/key/bias', lambda w: w.reshape(kv, dh)),
      'self_attn.v_proj.bias': ('attn/value/bias', lambda w: w.reshape(kv, dh)),
      'self_attn.o_proj.weight': ('attn/out/kernel',
                                  lambda w: w.T.reshape(h, dh, d)),
      'self_attn.o_proj.bias': ('attn/out/bias', same),
      'mlp.gate_proj.weight': ('mlp/wi/kernel', lambda w: w.T),
      'mlp.up_proj.weight': ('mlp/wi_gate/kernel', lambda w: w.T),
      'mlp.down_proj.weight': ('mlp/wo/kernel', lambda w: w.T),
      'mlp.gate_proj.bias': ('mlp/wi/bias', same),
      'mlp.up_proj.bias': ('mlp/wi_gate/bias', same),
      'mlp.down_proj.bias': ('mlp/wo/bias', same),
  }
  for full, w in tensors:
    if full.startswith(_SKIPPED):
      continue
    key = next((full[len(p):] for p in _PREFIXES if full.startswith(p)),
               full)
    if key == 'embed_tokens.weight':
      yield full, 'embedding', w
    elif key == 'norm.weight':
      yield full, 'final_norm/scale', w
    elif key == 'lm_head.weight':
      if not cfg.tie_embeddings:  # Tied checkpoints may still store a copy.
        yield full, 'unembedding', w.T
    elif key.startswith('layers.') and key.count('.') >= 2:
      _, i, rest = key.split('.', 2)
      if rest in table:
        name, fn = table[rest]
        yield full, f'layer_{i}/{name}', _fit(full, fn, w)
      elif not rest.endswith('rotary_emb.inv_freq'):  # A recomputed buffer.
        raise ValueError(f'Unexpected tensor {full!r} in the checkpoint.')
    else:
      raise ValueError(f'Unexpected tensor {full!r} in the checkpoint.')


def _gpt2_weights(cfg: transformer.DecoderConfig,
                  tensors: Iterator[tuple[str, np.ndarray]]) -> Converted:
  h, d, dh = cfg.num_heads, cfg.d_model, cfg.dim_per_head
  same = lambda w: w
  # GPT-2's Conv1D weights are already [in, out].
  table = {
      'ln_1.weight': ('attn_norm/scale', same),
      'ln_1.bias': ('attn_norm/bias', same),
      'ln_2.weight': ('mlp_norm/scale', same),
      'ln_2.bias': ('mlp_norm/bias', same),
      'attn.c_proj.weight': ('attn/out/kernel', lambda w: w.reshape(h, dh, d)),
      'attn.c_proj.bias': ('attn/out/bias', same),
      'mlp.c_fc.weight': ('mlp/wi/kernel', same),
      'mlp.c_fc.bias': ('mlp/wi/bias', same),
      'mlp.c_proj.weight': ('mlp/wo/kernel', same),
      'mlp.c_proj.bias': ('mlp/wo/bias', same),
  }
  for full, w in tensors:
    key = full.removeprefix('transformer.')
    if key == 'wte.weight':
      yield full, 'embedding', w
    elif key == 'wpe.weight':
      yield full, 'pos_embedding', w
    elif key == 'ln_f.weight':
      yield full, 'final_norm/scale', w
    elif key == 'ln_f.bias':
      yield full, 'final_norm/bias', w
    elif key == 'lm_head.weight':
      if not cfg.tie_embeddings:
        yield full, 'unembedding', w.T
    elif key.startswith('h.') and key.count('.') >= 2:
      _, i, rest = key.split('.', 2)
      pre = f'layer_{i}'
      if rest in ('attn.bias', 'attn.masked_bias'):
        continue  # Causal-mask buffers of old checkpoints.
      if rest == 'attn.c_attn.weight':  # [in, 3 * out]: q, k, v.
        qkv = _fit(full, lambda w: w.reshape(d, 3, h, dh), w)
        for j, name in enumerate(('query', 'key', 'value')):
          yield full, f'{pre}/attn/{name}/kernel', qkv[:, j]
      elif rest == 'attn.c_attn.bias':
        qkv = _fit(full, lambda w: w.reshape(3, h, dh), w)
        for j, name in enumerate(('query', 'key', 'value')):
          yield full, f'{pre}/attn/{name}/bias', qkv[j]
      elif rest in table:
        name, fn = table[rest]
        yield full, f'{pre}/{name}', _fit(full, fn, w)
      else:
        raise ValueError(f'Unexpected tensor {full!r} in the checkpoint.')
    else:
      raise ValueError(f'Unexpected tensor {full!r} in the checkpoint.')


def _flat(tree: Any) -> dict[str, Any]:
  """{'layer_0/attn/query/kernel': leaf} for a nested params-like dict."""
  return {'/'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nest(flat: dict[str, Any]) -> Params:
  out: Params = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def load_pretrained(path: str | os.PathLike, dtype: str = 'float32',
                    shardings: Any = None, max_len: int | None = None
                    ) -> tuple[transformer.Decoder, Params]:
  """(model, params) from a Hugging Face-layout checkpoint directory.

  Args:
    path: directory with config.json and *.safetensors (one file, or shards
      with `model.safetensors.index.json`).
    dtype: what the params are held and computed in ('float32',
      'bfloat16', 'float16'), whatever the checkpoint stores.
    shardings: optional tree of `jax.sharding.Sharding` shaped like the
      params (e.g. `sharding.param_shardings` of the boxed abstract params);
      each array goes straight there as it is read.
    max_len: context length (and decode-cache size) instead of the
      checkpoint's `max_position_embeddings`, which for recent models is far
      more than a cache should hold. Learned positions (GPT-2) can only
      shrink.
  """
  path = os.fspath(path)
  family, cfg = read_config(path)
  if dtype not in transformer.DTYPES:
    raise ValueError(f'dtype={dtype!r}; choose one of '
                     f'{sorted(transformer.DTYPES)}.')
  overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=dtype)
  if max_len is not None:
    if cfg.position == 'learned' and max_len > cfg.max_len:
      raise ValueError(f'max_len={max_len}: {path} has learned positions '
                       f'for only {cfg.max_len} tokens.')
    overrides['max_len'] = int(max_len)
  cfg = dataclasses.replace(cfg, **overrides).validate('load_pretrained')
  model = transformer.Decoder(cfg)
  expected = _flat(nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])))
  placements = _flat(shardings) if shardings is not None else {}
  if shardings is not None and set(placements) != set(expected):
    raise ValueError(
        f'shardings does not match the params of {path}: missing '
        f'{sorted(set(expected) - set(placements))[:5]}, unexpected '
        f'{sorted(set(placements) - set(expected))[:5]}.')

  target = transformer.DTYPES[dtype]
  convert = _gpt2_weights if family == 'gpt2' else _llama_weights
  loaded: dict[str, jax.Array] = {}
  for key, name, w in convert(cfg, _tensors(path)):
    if name not in expected:
      raise ValueError(f'{path}: tensor {key!r} ({name}) has no place in the '
                       'model its config.json describes.')
    if name == 'pos_embedding':  # A shorter max_len keeps the first rows.
      w = w[:cfg.max_len]
    if w.shape != expected[name].shape:
      raise ValueError(f'{path}: tensor {key!r} of shape {w.shape} does not '
                       f'fit the sizes in config.json ({name} should be '
                       f'{expected[name].shape}).')
    # Cast on the host: a bf16 model then never exists in float32 anywhere.
    # Placed on shardings, each device's shard is read on its own, so a
    # process reads only the bytes of the shards it holds.
    cast = lambda block: np.ascontiguousarray(block, dtype=np.dtype(target))
    place = placements.get(name)
    if place is None:
      loaded[name] = jax.device_put(cast(np.asarray(w)))
    else:
      loaded[name] = jax.make_array_from_callback(
          w.shape, place, lambda index, w=w: cast(
              w.read(index) if isinstance(w, _Lazy) else np.asarray(w)[index]))
  missing = sorted(set(expected) - set(loaded))
  if missing:
    raise ValueError(f'{path}: the checkpoint lacks {len(missing)} of the '
                     f'parameters its config.json implies, e.g. {missing[:5]}.')
  return model, _nest(loaded)
