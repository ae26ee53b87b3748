"""Incremental decoding with KV caches, for plain and composed LMs.

Both models keep caches (linen's `cache` collection): each step feeds one
token to every model — the anchor, each augmenting model, and the bridges,
whose caches hold the projected augmenting states — which is the paper's
decoding rule. Prompts of different lengths share one batch the way the Flax
lm1b example does it: every row steps from position 0; while a row is still
inside its prompt the next input is forced to the prompt token, afterwards
it is the model's choice. One compiled loop serves every batch of a shape.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def max_len_of(model: nn.Module) -> int:
  """Cache length of a Decoder (`config`) or a ComposedLM (`anchor`)."""
  cfg = getattr(model, 'config', None) or getattr(model, 'anchor')
  return cfg.max_len


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float,
                  top_k: int, top_p: float) -> jax.Array:
  """Next tokens [b] from logits [b, vocab]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, -1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    # Keep a token if the mass before it is < top_p (the first always stays).
    keep_sorted = (jnp.cumsum(probs, -1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id',
    'pad_id'))
def _generate(model, params, prompts, prompt_len, rng, model_kwargs, *,
              max_new_tokens, temperature, top_k, top_p, eos_id, pad_id):
  b, width = prompts.shape
  max_len = max_len_of(model)
  buf = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :width].set(prompts)
  # The init pass only creates zero caches; XLA drops the unused params.
  cache = model.init(jax.random.key(0), buf[:, :1], decode=True,
                     **model_kwargs)['cache']
  # Last position any row may fill.
  last = jnp.minimum(max_len - 1, jnp.max(prompt_len) + max_new_tokens - 1)

  def cond(state):
    t, _, _, done, _ = state
    return (t < last) & ~jnp.all(done)

  def body(state):
    t, buf, cache, done, rng = state
    rng, step_rng = jax.random.split(rng)
    tok = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
    logits, mutated = model.apply({'params': params, 'cache': cache}, tok,
                                  decode=True, mutable=['cache'],
                                  **model_kwargs)
    choice = sample_logits(logits[:, -1], step_rng, temperature, top_k, top_p)
    nxt = t + 1
    in_prompt = nxt < prompt_len
    generated = nxt - prompt_len + 1  # Tokens generated once nxt is written.
    forced = jax.lax.dynamic_slice_in_dim(buf, nxt, 1, axis=1)[:, 0]
    new = jnp.where(in_prompt, forced, jnp.where(done, pad_id, choice))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new[:, None], nxt, axis=1)
    done = done | (~in_prompt & ((new == eos_id) |
                                 (generated >= max_new_tokens)))
    return nxt, buf, mutated['cache'], done, rng

  state = (jnp.array(0, jnp.int32), buf, cache, jnp.zeros((b,), bool), rng)
  _, buf, _, _, _ = jax.lax.while_loop(cond, body, state)
  return _finish(buf, prompt_len, max_new_tokens, eos_id, pad_id)


def _finish(buf, prompt_len, max_new_tokens, eos_id, pad_id):
  """Splits the buffer into the generated part; pads after the first EOS."""
  max_len = buf.shape[1]
  idx = prompt_len[:, None] + jnp.arange(max_new_tokens)[None]
  new = jnp.take_along_axis(buf, jnp.minimum(idx, max_len - 1), 1)
  new = jnp.where(idx < max_len, new, pad_id)
  after_eos = jnp.cumsum(new == eos_id, 1) - (new == eos_id) > 0
  new = jnp.where(after_eos, pad_id, new)
  num_new = jnp.sum(new != pad_id, 1).astype(jnp.int32)
  positions = jnp.arange(max_len)[None]
  whole = jnp.where(positions < prompt_len[:, None], buf, pad_id)
  # Write the cleaned completion back after each row's prompt.
  rows = jnp.arange(buf.shape[0])[:, None]
  whole = whole.at[rows, jnp.minimum(idx, max_len - 1)].set(
      jnp.where(idx < max_len, new, whole[rows, jnp.minimum(idx,
                                                            max_len - 1)]))
  return {'tokens': whole, 'new_tokens': new, 'num_new': num_new}


def _check(model, prompts, prompt_len, max_new_tokens, temperature, top_k,
           top_p) -> None:
  max_len = max_len_of(model)
  if prompts.ndim != 2 or prompt_len.shape != prompts.shape[:1]:
    raise ValueError(f'prompts must be [batch, length] and prompt_len '
                     f'[batch]; got {prompts.shape} and {prompt_len.shape}.')
  if prompts.shape[1] > max_len:
    raise ValueError(f'prompts are {prompts.shape[1]} tokens wide but the '
                     f'model max_len is {max_len}; trim the padding.')
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be positive, got '
                     f'{max_new_tokens}.')
  longest = int(np.max(jax.device_get(prompt_len)))
  if longest + max_new_tokens > max_len:
    raise ValueError(
        f'The longest prompt ({longest} tokens) + max_new_tokens='
        f'{max_new_tokens} exceeds the model max_len={max_len}; lower '
        'max_new_tokens (eval.max_new_tokens) or raise arch.max_len.')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}.')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0 (0: off), got {top_k}.')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}.')


def generate(model: nn.Module, params: Any, prompts: jax.Array,
             prompt_len: jax.Array, *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int = 2,
             pad_id: int = 0, model_kwargs: Mapping[str, Any] | None = None
             ) -> dict[str, jax.Array]:
  """Completes right-padded `prompts` [b, L] (BOS + prompt) with caches.

  Returns `tokens` [b, max_len] (prompt + completion, pad after), and
  `new_tokens` [b, max_new_tokens] (the completion, pad after EOS) with
  `num_new` [b] non-pad generated tokens.
  """
  _check(model, prompts, prompt_len, max_new_tokens, temperature, top_k,
         top_p)
  return _generate(
      model, params, jnp.asarray(prompts, jnp.int32),
      jnp.asarray(prompt_len, jnp.int32),
      jax.random.key(0) if rng is None else rng, dict(model_kwargs or {}),
      max_new_tokens=max_new_tokens, temperature=float(temperature),
      top_k=int(top_k), top_p=float(top_p), eos_id=eos_id, pad_id=pad_id)


def generate_uncached(model: nn.Module, params: Any, prompts: jax.Array,
                      prompt_len: jax.Array, *, max_new_tokens: int,
                      eos_id: int = 2, pad_id: int = 0,
                      model_kwargs: Mapping[str, Any] | None = None
                      ) -> dict[str, jax.Array]:
  """Greedy decoding that recomputes the whole sequence every step.

  Slow and simple: the reference the cached decoder is tested against.
  """
  _check(model, prompts, prompt_len, max_new_tokens, 0.0, 0, 1.0)
  kw = dict(model_kwargs or {})
  prompts = np.asarray(prompts)
  plen = np.asarray(prompt_len)
  b, width = prompts.shape
  max_len = max_len_of(model)
  buf = np.full((b, max_len), pad_id, np.int32)
  buf[:, :width] = prompts
  forward = jax.jit(lambda p, x, kw: model.apply({'params': p}, x, **kw))
  done = np.zeros(b, bool)
  for t in range(min(max_len - 1, int(plen.max()) + max_new_tokens - 1)):
    if done.all():
      break
    logits = np.asarray(forward(params, jnp.asarray(buf), kw))
    choice = logits[:, t].argmax(-1)
    nxt = t + 1
    in_prompt = nxt < plen
    new = np.where(in_prompt, buf[:, nxt], np.where(done, pad_id, choice))
    buf[:, nxt] = new
    done |= ~in_prompt & ((new == eos_id) |
                          (nxt - plen + 1 >= max_new_tokens))
  return jax.device_get(_finish(jnp.asarray(buf), jnp.asarray(plen),
                                max_new_tokens, eos_id, pad_id))


def decode_texts(new_tokens: np.ndarray, tokenizer) -> list[str]:
  """The completions as strings (the tokenizer stops at EOS)."""
  return [tokenizer.decode([int(t) for t in row])
          for row in np.asarray(new_tokens)]


def stream(model: nn.Module, params: Any, prompt: Sequence[int], *,
           max_new_tokens: int, rng: jax.Array | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int = 2, model_kwargs: Mapping[str, Any] | None = None):
  """Yields the completion of one prompt token by token, as it is made.

  The same cached step as `generate`, driven from Python so each token can
  be shown as soon as it exists.
  """
  prompt = np.asarray(prompt, np.int32)[None]
  plen = np.array([prompt.shape[1]], np.int32)
  _check(model, prompt, plen, max_new_tokens, temperature, top_k, top_p)
  kw = dict(model_kwargs or {})
  cache = jax.jit(lambda t: model.init(jax.random.key(0), t, decode=True,
                                       **kw)['cache'])(prompt[:, :1])

  @jax.jit
  def step(cache, tok, rng):
    logits, mutated = model.apply({'params': params, 'cache': cache}, tok,
                                  decode=True, mutable=['cache'], **kw)
    return mutated['cache'], sample_logits(logits[:, -1], rng, temperature,
                                           top_k, top_p)

  rng = jax.random.key(0) if rng is None else rng
  for t in range(prompt.shape[1] - 1):  # Fill the caches with the prompt.
    cache, _ = step(cache, prompt[:, t:t + 1], rng)
  tok = prompt[:, -1:]
  for _ in range(max_new_tokens):
    rng, sub = jax.random.split(rng)
    cache, nxt = step(cache, tok, sub)
    nxt = int(nxt[0])
    if nxt == eos_id:
      return
    yield nxt
    tok = np.array([[nxt]], np.int32)
