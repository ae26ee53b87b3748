"""The small public API for notebooks and scripts.

    import calm_jax
    model, params = calm_jax.compose(
        '/ckpts/llama', {'code': ('/ckpts/code_lm', [(3, 7), (7, 15)])})
    logits = model.apply({'params': params}, tokens)   # Starts as the anchor.

    model, params = calm_jax.load_composition('W/runs/calm/seed_0')
    tokenizer = calm_jax.load_tokenizer('W/runs/calm/seed_0')
    out = calm_jax.decoding.generate(model, params, prompts, prompt_len,
                                     max_new_tokens=32,
                                     model_kwargs={'prompt_len': prompt_len})

Both return `(model, params)`: a `ComposedLM` and its whole parameter tree
({'anchor', 'aug_<name>', 'composition'}), for `model.apply` and for
`calm_jax.decoding`. Only `params['composition']` is meant to train (see
`calm_jax.tasks.composition_task` for the training loop's use).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import checkpoints
from calm_jax import compositions
from calm_jax import config_lib
from calm_jax.data import tokenizers
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

# A model: a directory (calm_jax's or Hugging Face's), or (model, params).
ModelLike = Union[str, os.PathLike, tuple[transformer.Decoder, Any]]
# Where an augmenting model joins: explicit (aug_layer, anchor_layer)
# pairs, or k of the paper's rule (every k-th layer); None is k = 4.
Pairs = Union[Sequence[Sequence[int]], int, None]


def _load(model: ModelLike, what: str, dtype: str, max_len: int | None
          ) -> tuple[transformer.DecoderConfig, Any]:
  if isinstance(model, (str, os.PathLike)):
    cfg, params = checkpoints.load_model(os.fspath(model), what,
                                         max_len=max_len)
  else:
    decoder, params = model
    if not isinstance(decoder, transformer.Decoder):
      raise TypeError(f'{what}: expected a directory or (Decoder, params), '
                      f'got a {type(decoder).__name__}.')
    cfg = decoder.config
  return transformer.cast(cfg, params, dtype)


def compose(anchor: ModelLike,
            augmenting: Mapping[str, tuple[ModelLike, Pairs]], *,
            seed: int = 0, bridge: str = 'paper', cross_heads: int = 0,
            prompt_only: bool = False, dtype: str = 'float32',
            max_len: int | None = None, align: str = 'auto', **options: Any
            ) -> tuple[composition_lib.ComposedLM, dict[str, Any]]:
  """A new composition of `anchor` with `augmenting` ({name: (model,
  pairs)}), its bridges initialised with `seed` (it computes exactly the
  anchor's logits until they train).

  `bridge` names the bridge ('paper', or 'ours' with `options` such as
  `recency_bias=True`, see `calm_jax.models.bridges`); `dtype` is what the
  frozen models are held in; `max_len` caps Hugging Face checkpoints'
  context. Models given as directories hold or record their tokenizers;
  when an augmenting model's is not the anchor's (token-to-id maps are
  compared), `align='auto'` composes them aligned by characters (each
  model reads the text in its own tokenizer, `calm_jax.data.align`; decode
  with `calm_jax.aligned_decoding`), `'none'` refuses. Every embedding
  table must be as large as its model's tokenizer.
  """
  if align not in ('auto', 'none', 'chars'):
    raise ValueError(f"align={align!r} must be 'auto', 'none' or 'chars'.")
  if not augmenting:
    raise ValueError('augmenting is empty; give {name: (model, pairs)}.')
  anchor_cfg, anchor_params = _load(anchor, 'anchor', dtype, max_len)
  params = {'anchor': anchor_params}
  tok = None
  if isinstance(anchor, (str, os.PathLike)):
    try:
      tok = load_tokenizer(os.fspath(anchor))
    except ValueError:  # A directory that neither holds nor records one.
      tok = None
  augs = []
  aligned_toks = {}
  for name, spec in augmenting.items():
    if not isinstance(spec, tuple) or len(spec) != 2:
      raise ValueError(f'augmenting[{name!r}] must be (model, pairs), got '
                       f'{spec!r}.')
    model, pairs = spec
    field = f'augmenting[{name!r}]'
    cfg, params[f'aug_{name}'] = _load(model, field, dtype, max_len)
    own = None
    if tok is not None and isinstance(model, (str, os.PathLike)):
      try:
        own = load_tokenizer(os.fspath(model))
      except ValueError:
        own = None
    if own is not None and own.fingerprint != tok.fingerprint:
      if align == 'none':
        raise ValueError(
            f"{field} reads another tokenizer than the anchor "
            f'({tokenizers.difference(tok, own)}); pass align=\'chars\' (each '
            'model reads the text in its own tokenizer).')
      if align == 'auto':
        align = 'chars'
      aligned_toks[name] = own
      need = own.vocab_size
    elif tok is not None and isinstance(model, (str, os.PathLike)):
      config_lib.check_model_tokenizer(tok, os.fspath(model), field)
      need = tok.vocab_size
    else:
      need = tok.vocab_size if tok is not None else anchor_cfg.vocab_size
    if cfg.vocab_size < need:
      raise ValueError(
          f'{field} has {cfg.vocab_size} token ids, fewer than its '
          f'tokenizer ({need}).')
    if pairs is None or isinstance(pairs, int):
      pairs = composition_lib.select_pairs(
          cfg.num_layers, anchor_cfg.num_layers,
          4 if pairs is None else pairs, field)
    else:
      pairs = composition_lib.validate_pairs(
          pairs, cfg.num_layers, anchor_cfg.num_layers, field)
    augs.append(composition_lib.Augmenting(name, cfg, pairs))
  model = composition_lib.ComposedLM(
      anchor_cfg, tuple(augs), prompt_only=prompt_only,
      bridge=composition_lib.BridgeConfig.make(bridge, cross_heads, options,
                                               'options', 'bridge'),
      align='chars' if align == 'chars' else 'none')

  def init(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    aug_inputs = ({a.name: {'tokens': tokens, 'counts': jnp.ones_like(tokens),
                            'prompt_mask': jnp.ones_like(tokens)}
                   for a in augs} if model.aligned else None)
    variables = model.init(rng, tokens, prompt_len=jnp.ones((1,), jnp.int32),
                           aug_inputs=aug_inputs)
    return nn.meta.unbox(variables['params']['composition'])

  params['composition'] = jax.jit(init)(jax.random.key(seed))
  return model, params


def load_composition(run_dir: str, *, step: int | None = None,
                     dtype: str | None = None, **models: Any
                     ) -> tuple[composition_lib.ComposedLM, dict[str, Any]]:
  """A trained composition from its run directory (its composition.json).

  `step` defaults to the latest checkpoint, `dtype` to the one it was
  trained with; `anchor=` and `augmenting={name: dir}` may point at the
  same models elsewhere (their fingerprints must match the recorded ones).
  """
  model, params, _, _ = compositions.load(run_dir, step=step, dtype=dtype,
                                          **models)
  return model, params


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """The tokenizer of a composition run directory, of a checkpoint
  directory, or named by a `data.tokenizer` value ('byte', 'char:N')."""
  if compositions.find(path) is not None:
    return tokenizers.get_tokenizer(compositions.read(path)['tokenizer']['spec'])
  if os.path.isdir(path) and tokenizers.has_tokenizer(path):
    return tokenizers.checkpoint_tokenizer(path, 'path')
  record = checkpoints.read_model_json(path).get('tokenizer') if os.path.isdir(
      path) else None
  if record:
    return tokenizers.get_tokenizer(record['spec'])
  return tokenizers.get_tokenizer(path, field='path')
