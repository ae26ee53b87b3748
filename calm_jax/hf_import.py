"""Load Hugging Face-layout checkpoints (config.json + *.safetensors).

Supported families: the Llama family (Llama 2/3 with GQA and Llama-3 RoPE
scaling; Mistral and Qwen2, which differ only in config), Gemma 1, and
GPT-2. Weights are read with `safetensors` (numpy; no torch or transformers
at run time), transposed into this library's kernel layout, cast to the
requested dtype and, when shardings are given, placed on the mesh as they
are read.

    model, params = calm_jax.load_pretrained('/ckpts/llama', dtype='bfloat16')
    logits = model.apply({'params': params}, tokens)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np

from calm_jax.models import transformer

Params = dict[str, Any]


# ------------------------------------------------------------------ config


def _llama(c: dict[str, Any]) -> dict[str, Any]:
  # transformers >= 5 writes `rope_parameters` (theta inside); older
  # versions `rope_scaling` beside a top-level `rope_theta`.
  scaling = c.get('rope_parameters') or c.get('rope_scaling') or {}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  theta = c.get('rope_theta') or scaling.get('rope_theta') or 10_000.0
  if kind not in ('default', 'llama3'):
    raise ValueError(f'config.json rope_scaling type {kind!r} is not '
                     "supported; only 'llama3' scaling is.")
  act = c.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'config.json hidden_act={act!r}: the Llama family '
                     "here uses 'silu'.")
  out = dict(
      vocab_size=c['vocab_size'], d_model=c['hidden_size'],
      num_layers=c['num_hidden_layers'], num_heads=c['num_attention_heads'],
      num_kv_heads=c.get('num_key_value_heads') or c['num_attention_heads'],
      head_dim=c.get('head_dim') or c['hidden_size'] // c[
          'num_attention_heads'],
      d_ff=c['intermediate_size'], max_len=c['max_position_embeddings'],
      norm='rmsnorm', norm_eps=c.get('rms_norm_eps', 1e-6), position='rope',
      rope_theta=theta, mlp='gated_silu',
      tie_embeddings=c.get('tie_word_embeddings', False),
      qkv_bias=c.get('model_type') == 'qwen2' or c.get('attention_bias',
                                                         False))
  if kind == 'llama3':
    out.update(rope_scaling='llama3', rope_factor=scaling['factor'],
               rope_low_freq_factor=scaling['low_freq_factor'],
               rope_high_freq_factor=scaling['high_freq_factor'],
               rope_original_max_len=scaling[
                   'original_max_position_embeddings'])
  return out


def _gemma(c: dict[str, Any]) -> dict[str, Any]:
  out = _llama(dict(c, hidden_act='silu', tie_word_embeddings=True))
  act = c.get('hidden_activation') or c.get('hidden_act') or 'gelu_pytorch_tanh'
  if 'gelu' not in act:
    raise ValueError(f'config.json hidden_activation={act!r} is not GeGLU.')
  out.update(mlp='gated_gelu', scale_embeddings=True, norm_scale_offset=1.0,
             tie_embeddings=True)
  return out


def _gemma2(c: dict[str, Any]) -> dict[str, Any]:
  """Gemma 2 and Gemma 3 text: sandwich norms, soft-caps, local layers."""
  rope = c.get('rope_parameters') or {}
  per_type = 'full_attention' in rope  # transformers >= 5, Gemma 3.
  glob = rope.get('full_attention', rope) if per_type else rope
  local = rope.get('sliding_attention', {}) if per_type else {}
  base = dict(c, rope_parameters=None, rope_scaling=None,
              rope_theta=glob.get('rope_theta') or c.get('rope_theta'))
  out = _gemma(base)
  n = c['num_hidden_layers']
  types = c.get('layer_types') or [
      'sliding_attention' if i % 2 == 0 else 'full_attention'
      for i in range(n)]  # Gemma 2 before `layer_types`.
  scaling = glob if per_type else (c.get('rope_scaling') or {})
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in ('default', 'linear'):
    raise ValueError(f'config.json: rope type {kind!r} is not supported '
                     "for Gemma; 'default' and 'linear' are.")
  out.update(
      post_norms=True, attn_logit_softcap=c.get('attn_logit_softcapping'),
      logit_softcap=c.get('final_logit_softcapping'),
      query_scale=c['query_pre_attn_scalar'] ** -0.5,
      sliding_window=c.get('sliding_window') or 0,
      sliding_layers=tuple(i for i, t in enumerate(types)
                           if t == 'sliding_attention'),
      qk_norm=c.get('model_type') == 'gemma3_text',
      local_rope_theta=(local.get('rope_theta') or
                        c.get('rope_local_base_freq')))
  if kind == 'linear':
    out.update(rope_scaling='linear', rope_factor=scaling['factor'])
  if not out['sliding_layers']:
    out['sliding_window'] = 0
  return out


def _gpt2(c: dict[str, Any]) -> dict[str, Any]:
  act = c.get('activation_function', 'gelu_new')
  if act not in ('gelu_new', 'gelu_pytorch_tanh'):
    raise ValueError(f'config.json activation_function={act!r} is not '
                     "supported for GPT-2; 'gelu_new' is.")
  d = c['n_embd']
  return dict(
      vocab_size=c['vocab_size'], d_model=d, num_layers=c['n_layer'],
      num_heads=c['n_head'], d_ff=c.get('n_inner') or 4 * d,
      max_len=c['n_positions'], norm='layernorm',
      norm_eps=c.get('layer_norm_epsilon', 1e-5), position='learned',
      mlp='gelu', tie_embeddings=True, use_bias=True)


FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    'llama': _llama, 'mistral': _llama, 'qwen2': _llama, 'gemma': _gemma,
    'gemma2': _gemma2, 'gemma3_text': _gemma2, 'gpt2': _gpt2,
}


def read_config(path: str) -> tuple[str, transformer.DecoderConfig]:
  """(model_type, DecoderConfig) from a checkpoint's config.json."""
  file = os.path.join(path, 'config.json')
  try:
    with open(file) as f:
      c = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{file} is missing or not JSON ({e}); a Hugging Face '
                     'checkpoint directory needs config.json.') from e
  family = c.get('model_type')
  if family not in FAMILIES:
    raise ValueError(f'{file}: model_type={family!r} is not supported; '
                     f'supported: {sorted(FAMILIES)}.')
  return family, transformer.DecoderConfig.from_dict(FAMILIES[family](c),
                                                     file)


# ----------------------------------------------------------------- weights


def _tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of the checkpoint, shard by shard (index or single file)."""
  from safetensors.numpy import safe_open  # Deferred: optional dependency.
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise ValueError(f'{path} holds no *.safetensors files.')
  for name in files:
    with safe_open(os.path.join(path, name), framework='numpy') as f:
      for key in f.keys():
        yield key, f.get_tensor(key)


def _set(tree: Params, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _llama_weights(cfg, tensors) -> Params:
  h, kv, d, dh = cfg.num_heads, cfg.kv_heads, cfg.d_model, cfg.dim_per_head
  out: Params = {}
  for key, w in tensors:
    key = key.removeprefix('model.')
    if key == 'embed_tokens.weight':
      _set(out, 'embedding', w)
    elif key == 'norm.weight':
      _set(out, 'final_norm/scale', w)
    elif key == 'lm_head.weight':
      if not cfg.tie_embeddings:
        _set(out, 'unembedding', w.T)
    elif key.startswith('layers.'):
      _, i, rest = key.split('.', 2)
      pre = f'layer_{i}'
      table = {
          'input_layernorm.weight': ('attn_norm/scale', lambda w: w),
          # Gemma 2/3 norm both sides of each branch; Llama only before.
          'post_attention_layernorm.weight': (
              'post_attn_norm/scale' if cfg.post_norms else 'mlp_norm/scale',
              lambda w: w),
          'pre_feedforward_layernorm.weight': ('mlp_norm/scale', lambda w: w),
          'post_feedforward_layernorm.weight': ('post_mlp_norm/scale',
                                                lambda w: w),
          'self_attn.q_norm.weight': ('attn/query_norm/scale', lambda w: w),
          'self_attn.k_norm.weight': ('attn/key_norm/scale', lambda w: w),
          'self_attn.q_proj.weight': ('attn/query/kernel',
                                      lambda w: w.T.reshape(d, h, dh)),
          'self_attn.k_proj.weight': ('attn/key/kernel',
                                      lambda w: w.T.reshape(d, kv, dh)),
          'self_attn.v_proj.weight': ('attn/value/kernel',
                                      lambda w: w.T.reshape(d, kv, dh)),
          'self_attn.q_proj.bias': ('attn/query/bias',
                                    lambda w: w.reshape(h, dh)),
          'self_attn.k_proj.bias': ('attn/key/bias',
                                    lambda w: w.reshape(kv, dh)),
          'self_attn.v_proj.bias': ('attn/value/bias',
                                    lambda w: w.reshape(kv, dh)),
          'self_attn.o_proj.weight': ('attn/out/kernel',
                                      lambda w: w.T.reshape(h, dh, d)),
          'mlp.gate_proj.weight': ('mlp/wi/kernel', lambda w: w.T),
          'mlp.up_proj.weight': ('mlp/wi_gate/kernel', lambda w: w.T),
          'mlp.down_proj.weight': ('mlp/wo/kernel', lambda w: w.T),
      }
      if rest in table:
        name, fn = table[rest]
        _set(out, f'{pre}/{name}', fn(w))
      elif not rest.endswith('rotary_emb.inv_freq'):
        raise ValueError(f'Unexpected tensor {key!r} in the checkpoint.')
  return out


def _gpt2_weights(cfg, tensors) -> Params:
  h, d, dh = cfg.num_heads, cfg.d_model, cfg.dim_per_head
  out: Params = {}
  for key, w in tensors:
    key = key.removeprefix('transformer.')
    if key == 'wte.weight':
      _set(out, 'embedding', w)
    elif key == 'wpe.weight':
      _set(out, 'pos_embedding', w)
    elif key in ('ln_f.weight', 'ln_f.bias'):
      _set(out, f"final_norm/{'scale' if key.endswith('weight') else 'bias'}",
           w)
    elif key == 'lm_head.weight':
      continue  # Tied to wte.
    elif key.startswith('h.'):
      _, i, rest = key.split('.', 2)
      pre = f'layer_{i}'
      if rest in ('attn.bias', 'attn.masked_bias'):
        continue  # Causal-mask buffers of old checkpoints.
      if rest == 'attn.c_attn.weight':  # Conv1D: [in, 3 * out].
        for name, part in zip(('query', 'key', 'value'), np.split(w, 3, 1)):
          _set(out, f'{pre}/attn/{name}/kernel', part.reshape(d, h, dh))
      elif rest == 'attn.c_attn.bias':
        for name, part in zip(('query', 'key', 'value'), np.split(w, 3)):
          _set(out, f'{pre}/attn/{name}/bias', part.reshape(h, dh))
      else:
        table = {
            'ln_1.weight': ('attn_norm/scale', lambda w: w),
            'ln_1.bias': ('attn_norm/bias', lambda w: w),
            'ln_2.weight': ('mlp_norm/scale', lambda w: w),
            'ln_2.bias': ('mlp_norm/bias', lambda w: w),
            'attn.c_proj.weight': ('attn/out/kernel',
                                   lambda w: w.reshape(h, dh, d)),
            'attn.c_proj.bias': ('attn/out/bias', lambda w: w),
            'mlp.c_fc.weight': ('mlp/wi/kernel', lambda w: w),
            'mlp.c_fc.bias': ('mlp/wi/bias', lambda w: w),
            'mlp.c_proj.weight': ('mlp/wo/kernel', lambda w: w),
            'mlp.c_proj.bias': ('mlp/wo/bias', lambda w: w),
        }
        if rest not in table:
          raise ValueError(f'Unexpected tensor {key!r} in the checkpoint.')
        name, fn = table[rest]
        _set(out, f'{pre}/{name}', fn(w))
  return out


def load_pretrained(path: str, dtype: str = 'float32',
                    shardings: Any = None
                    ) -> tuple[transformer.Decoder, Params]:
  """(model, params) from a Hugging Face-layout checkpoint directory.

  `dtype` is what the params are held and computed in; `shardings` (a tree
  of NamedSharding like the params) places each array as it is loaded.
  """
  family, cfg = read_config(path)
  if dtype not in transformer.DTYPES:
    raise ValueError(f'dtype={dtype!r}; choose one of '
                     f'{sorted(transformer.DTYPES)}.')
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
  convert = _gpt2_weights if family == 'gpt2' else _llama_weights
  loaded = convert(cfg, _tensors(path))
  model = transformer.Decoder(cfg)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 1), np.int32))['params'])
  expected = nn.meta.unbox(expected)
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): v.shape
         for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  if want != got:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    shapes = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
    raise ValueError(f'{path}: the checkpoint does not match its config '
                     f'(missing {missing}, unexpected {extra}, shape '
                     f'mismatches {shapes}).')
  target = transformer.DTYPES[dtype]
  cast = lambda x: np.asarray(x).astype(target)
  if shardings is None:
    params = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(cast(x)),
                                    loaded)
  else:
    params = jax.tree_util.tree_map(
        lambda x, s: jax.device_put(cast(x), s), loaded, shardings)
  return model, params


def check_same_vocab(models: dict[str, transformer.DecoderConfig]) -> None:
  """Composition needs one vocabulary; the error names every model."""
  sizes = {name: cfg.vocab_size for name, cfg in models.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError('Models with different vocabularies cannot be composed: '
                     + ', '.join(f'{n} has {v}' for n, v in sizes.items())
                     + '. Use models that share one tokenizer.')


class HFTokenizer:
  """A checkpoint's tokenizer with this library's tokenizer API.

  Reads `tokenizer.json` (the `tokenizers` library) or, failing that, a
  SentencePiece `tokenizer.model`; special tokens come from
  `tokenizer_config.json` when present.
  """

  def __init__(self, path: str):
    json_file = os.path.join(path, 'tokenizer.json')
    sp_file = os.path.join(path, 'tokenizer.model')
    special = {}
    config = os.path.join(path, 'tokenizer_config.json')
    if os.path.exists(config):
      with open(config) as f:
        special = json.load(f)
    if os.path.exists(json_file):
      from tokenizers import Tokenizer  # Deferred: optional dependency.
      self._tok = Tokenizer.from_file(json_file)
      self.name = json_file
      self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
      lookup = self._tok.token_to_id
      self._encode = lambda t: self._tok.encode(
          t, add_special_tokens=False).ids
      self._decode = self._tok.decode
      defaults = (1, 2, 0)
    elif os.path.exists(sp_file):
      import sentencepiece  # Deferred: optional dependency.
      sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
      self.name = sp_file
      self.vocab_size = sp.get_piece_size()
      lookup = lambda tok: (sp.piece_to_id(tok) if sp.piece_to_id(tok)
                            != sp.unk_id() or tok == sp.id_to_piece(
                                sp.unk_id()) else None)
      self._encode = sp.encode
      self._decode = sp.decode
      defaults = (sp.bos_id(), sp.eos_id(), max(sp.pad_id(), 0))
    else:
      raise ValueError(f'{path} has neither tokenizer.json nor '
                       'tokenizer.model.')

    def token_id(field, default):
      tok = special.get(field)
      tok = tok.get('content') if isinstance(tok, dict) else tok
      found = lookup(tok) if tok else None
      return default if found is None else found
    self.bos_id = token_id('bos_token', defaults[0])
    self.eos_id = token_id('eos_token', defaults[1])
    self.pad_id = token_id('pad_token', defaults[2])

  def encode(self, text: str) -> list[int]:
    return list(self._encode(text))

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if i not in (self.pad_id,
                                                     self.bos_id)])
