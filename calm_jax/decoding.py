"""Incremental decoding with KV caches, for plain and composed LMs.

Both models keep caches (linen's `cache` collection): each step feeds one
token to every model — the anchor, each augmenting model, and the bridges,
whose caches hold the projected augmenting states — which is the paper's
decoding rule. The prompt is read first in one parallel call (prefill), as
far as the shortest prompt of the batch goes; from there prompts of
different lengths share one batch the way the Flax lm1b example does it:
while a row is still inside its prompt the next input is forced to the
prompt token, afterwards it is the model's choice. One compiled loop serves
every batch of a shape. A prompt-only composition, whose bridges read m_A
at prompt positions only, stops running m_A once every row is past its
prompt.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models import transformer

Array = jax.Array


def max_len_of(model: nn.Module) -> int:
  """Cache length of a Decoder (`config`) or a ComposedLM (`anchor`)."""
  cfg = getattr(model, 'config', None) or getattr(model, 'anchor', None)
  if cfg is None:
    raise TypeError(f'Cannot decode with {type(model).__name__}: expected a '
                    'transformer.Decoder or a composition.ComposedLM.')
  return cfg.max_len


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int,
                  top_p: float) -> Array:
  """Next tokens [b] from logits [b, vocab]; temperature 0 is greedy.

  Top-k and then top-p (the smallest set of most likely tokens whose mass
  reaches `top_p`, renormalised after top-k) restrict what is sampled.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    # A token stays if the mass strictly before it is < top_p, so the most
    # likely token always stays; the smallest kept logit is the cutoff.
    keep = (jnp.cumsum(probs, -1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), -1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def _zero_cache(model: nn.Module, first: Array,
                model_kwargs: Mapping[str, Any]) -> Any:
  # The init pass only creates zero caches; under jit XLA drops the params.
  return model.init(jax.random.key(0), first, decode=True,
                    **model_kwargs)['cache']


# The cache variables that count the tokens cached so far: update_cache's
# and DecodePosition's (transformer.py).
_INDICES = ('cache_index', 'index')


def _prefill(model: nn.Module, params: Any, cache: Any, tokens: Array,
             keep: Array, model_kwargs: Mapping[str, Any]) -> Any:
  """The zero `cache` after reading `tokens` [b, w] in one call, of which
  the first `keep` (traced, <= w) stay: exactly what `keep` one-token steps
  leave. Every index is set back to `keep`; the slots from there on hold
  what the masks hide until the next steps write over them. Causal
  attention makes slot s depend on tokens <= s only, so the first `keep`
  slots are the same whatever the later tokens are."""
  _, mutated = model.apply({'params': params, 'cache': cache}, tokens,
                           decode=True, mutable=['cache'], **model_kwargs)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(
      mutated['cache']))
  return flax.traverse_util.unflatten_dict({
      path: jnp.full_like(x, keep) if path[-1] in _INDICES else x
      for path, x in flat.items()})


def _reads_prompt_only(model: nn.Module) -> bool:
  """A composition whose bridges read m_A's states at prompt positions
  only: once every row is past its prompt, m_A need not run."""
  return (getattr(model, 'prompt_only', False)
          and not getattr(model, 'aligned', False))


def _no_augmenting_states(model: nn.Module, b: int) -> dict[str, Any]:
  """Stand-ins for m_A's states of one decode step, past every prompt:
  zeros, which the bridges cache but their masks never read."""
  return {a.name: {i: jnp.zeros((b, 1, a.config.d_model),
                                transformer.DTYPES[a.config.dtype])
                   for i in a.layers}
          for a in model.augmenting}


def _decode_step(model: nn.Module, params: Any, cache: Any, tok: Array,
                 model_kwargs: Mapping[str, Any], past_prompts: bool = False
                 ) -> tuple[Array, Any]:
  """Logits [b, 1, vocab] and the new cache for one token per row.

  `past_prompts` (a prompt-only composition, every row past its prompt):
  the augmenting models do not run; their caches stay as they are.
  """
  aug = {}
  if past_prompts and _reads_prompt_only(model):
    aug = {'aug_states': _no_augmenting_states(model, tok.shape[0])}
  logits, mutated = model.apply({'params': params, 'cache': cache}, tok,
                                decode=True, mutable=['cache'], **aug,
                                **model_kwargs)
  return logits, mutated['cache']


def _skip_keys(rng: Array, n: Array) -> Array:
  """`rng` after n steps' splits: prefilled steps draw as the loop would."""
  return jax.lax.fori_loop(0, n, lambda _, r: jax.random.split(r)[0], rng)


@functools.lru_cache(maxsize=64)
def _compiled_generate(model: nn.Module, total_len: int, max_new_tokens: int,
                       temperature: float, top_k: int, top_p: float
                       ) -> Callable[..., Any]:
  """The jitted decoding loop for one model and set of options.

  Cached here (the models are hashable) so that every batch of the same
  shape reuses one compiled loop; jit adds the per-shape cache below it.
  The ids `eos_id` and `pad_id` are traced: changing them compiles nothing.
  """

  def run(params, prompts, prompt_len, rng, model_kwargs, eos_id, pad_id):
    b, width = prompts.shape
    positions = jnp.arange(total_len)[None]
    width = min(width, total_len)  # Wider prompts end in padding.
    buf = jnp.full((b, total_len), pad_id, jnp.int32).at[:, :width].set(
        prompts[:, :width])
    # Pad past each prompt whatever the caller's padding held: `buf` is
    # then exactly the returned `tokens` once the loop ends.
    buf = jnp.where(positions < prompt_len[:, None], buf, pad_id)
    cache = _zero_cache(model, buf[:, :1], model_kwargs)
    # The last position any row writes (its max_new_tokens-th new token).
    last = jnp.minimum(total_len, jnp.max(prompt_len) + max_new_tokens) - 1
    # Every row's prompt covers positions < shortest: those are read in one
    # call, and the loop starts at the last of them (its logits choose the
    # first new token of the shortest rows).
    start = jnp.min(prompt_len) - 1
    if width > 1:
      cache = _prefill(model, params, cache, buf[:, :width], start,
                       model_kwargs)
      rng = _skip_keys(rng, start)

    def cond(state):
      t, _, _, done, _ = state
      return (t < last) & ~jnp.all(done)

    def body(state, past_prompts=False):
      t, buf, cache, done, rng = state
      rng, step_rng = jax.random.split(rng)
      tok = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
      logits, cache = _decode_step(model, params, cache, tok, model_kwargs,
                                   past_prompts)
      choice = sample_logits(logits[:, -1], step_rng, temperature, top_k,
                             top_p)
      nxt = t + 1
      in_prompt = nxt < prompt_len
      forced = jax.lax.dynamic_slice_in_dim(buf, nxt, 1, axis=1)[:, 0]
      new = jnp.where(in_prompt, forced, jnp.where(done, pad_id, choice))
      buf = jax.lax.dynamic_update_slice_in_dim(buf, new[:, None], nxt,
                                                axis=1)
      count = nxt - prompt_len + 1  # New tokens of the row, this one too.
      done = done | (~in_prompt & ((new == eos_id) |
                                   (count >= max_new_tokens)))
      return nxt, buf, cache, done, rng

    state = (start.astype(jnp.int32), buf, cache, jnp.zeros((b,), bool),
             rng)
    if _reads_prompt_only(model):
      # No bridge reads m_A's state at a position >= every prompt_len: the
      # steps from there run without m_A, in a loop of their own (a
      # lax.cond inside one loop made the `peer` decode benchmark slower
      # than running m_A every step: 0.66-0.69x the anchor against 0.78).
      read_until = jnp.max(model_kwargs['prompt_len'])
      state = jax.lax.while_loop(lambda s: cond(s) & (s[0] < read_until),
                                 body, state)
      state = jax.lax.while_loop(
          cond, functools.partial(body, past_prompts=True), state)
    else:
      state = jax.lax.while_loop(cond, body, state)
    _, buf, _, _, _ = state
    # Every row ends done (its EOS, or max_new_tokens), so the completion
    # is the max_new_tokens slots after the prompt, already padded.
    idx = prompt_len[:, None] + jnp.arange(max_new_tokens)[None]
    new_tokens = jnp.take_along_axis(buf, jnp.minimum(idx, total_len - 1), 1)
    new_tokens = jnp.where(idx < total_len, new_tokens, pad_id)
    return {'tokens': buf, 'new_tokens': new_tokens,
            'num_new': _num_new(new_tokens, eos_id)}

  return jax.jit(run)


def _num_new(new_tokens: Array, eos_id: Array) -> Array:
  # Counted up to and including EOS, not as non-pad tokens: a model may
  # well generate the pad id itself.
  is_eos = new_tokens == eos_id
  return jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1,
                   new_tokens.shape[1]).astype(jnp.int32)


def _host_extremes(x: Any) -> tuple[int, int]:
  """min and max of an int array, also of a global multi-process one."""
  if isinstance(x, jax.Array):  # May not be fully addressable: reduce first.
    return int(jnp.min(x)), int(jnp.max(x))
  x = np.asarray(x)
  return int(x.min()), int(x.max())


def _check(model: nn.Module, prompts: Any, prompt_len: Any,
           max_new_tokens: int, rng: Array | None, temperature: float,
           top_k: int, top_p: float) -> int:
  """Validates the arguments; returns the output width `total_len`."""
  max_len = max_len_of(model)
  p_shape, l_shape = np.shape(prompts), np.shape(prompt_len)
  if len(p_shape) != 2 or l_shape != p_shape[:1]:
    raise ValueError(
        f'prompts must be int [batch, length] and prompt_len int [batch]; '
        f'got shapes {p_shape} and {l_shape}.')
  for name, x in (('prompts', prompts), ('prompt_len', prompt_len)):
    dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f'{name} must hold integer token ids/lengths, got '
                       f'dtype {dtype}.')
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be a positive int, got '
                     f'{max_new_tokens!r}.')
  if p_shape[0] == 0:
    raise ValueError('prompts is an empty batch.')
  shortest, longest = _host_extremes(prompt_len)
  if shortest < 1 or longest > p_shape[1]:
    raise ValueError(
        f'prompt_len must be in [1, {p_shape[1]}] (at least BOS, at most the '
        f'prompts width); got values in [{shortest}, {longest}].')
  if longest + max_new_tokens > max_len:
    raise ValueError(
        f'max_new_tokens={max_new_tokens}: the longest prompt ({longest} '
        f'tokens) + max_new_tokens = {longest + max_new_tokens} exceeds the '
        f"model's max_len={max_len} (the KV-cache length, DecoderConfig."
        f'max_len of the anchor). Lower max_new_tokens (eval.max_new_tokens)'
        f' or shorten the prompt, or build the model with a larger max_len.')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0 (0: greedy), got '
                     f'{temperature}.')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0 (0: off), got {top_k}.')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1] (1: off), got {top_p}.')
  if temperature > 0 and rng is None:
    raise ValueError(f'temperature={temperature} samples; pass '
                     'rng=jax.random.key(seed) (or temperature=0 for greedy).')
  return min(max_len, p_shape[1] + max_new_tokens)


def generate(model: nn.Module, params: Any, prompts: Array,
             prompt_len: Array, *, max_new_tokens: int,
             rng: Array | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int = 2,
             pad_id: int = 0, model_kwargs: Mapping[str, Any] | None = None
             ) -> dict[str, Array]:
  """Completes right-padded `prompts` [b, L] (BOS + prompt) with KV caches.

  Args:
    model: a `transformer.Decoder` or `composition.ComposedLM`.
    params: its parameters (unboxed).
    prompts: int [b, L], row i holds `prompt_len[i]` tokens then padding.
    prompt_len: int [b], between 1 and L.
    max_new_tokens: most tokens to generate per row; the longest prompt plus
      this must fit the model's max_len.
    rng: key for sampling; required when temperature > 0.
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample from the smallest set with this much mass (1: all).
    eos_id: a row stops after emitting it (-1: never).
    pad_id: fills everything after a row's last token.
    model_kwargs: array keyword arguments for every model call, e.g.
      `{'prompt_len': prompt_len}` for a prompt-only ComposedLM.

  Returns:
    `tokens` int32 [b, min(max_len, L + max_new_tokens)]: prompt and
    completion, pad after; `new_tokens` int32 [b, max_new_tokens]: the
    completion alone, EOS included, pad after; `num_new` int32 [b]: its
    length.
  """
  total_len = _check(model, prompts, prompt_len, max_new_tokens, rng,
                     temperature, top_k, top_p)
  run = _compiled_generate(model, total_len, int(max_new_tokens),
                           float(temperature), int(top_k), float(top_p))
  return run(params, jnp.asarray(prompts, jnp.int32),
             jnp.asarray(prompt_len, jnp.int32),
             jax.random.key(0) if rng is None else rng,
             dict(model_kwargs or {}), np.int32(eos_id), np.int32(pad_id))


@functools.lru_cache(maxsize=16)
def _compiled_forward(model: nn.Module) -> Callable[..., Array]:
  return jax.jit(lambda params, tokens, kw: model.apply(
      {'params': params}, tokens, **kw))


def generate_uncached(model: nn.Module, params: Any, prompts: Array,
                      prompt_len: Array, *, max_new_tokens: int,
                      rng: Array | None = None, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, eos_id: int = 2,
                      pad_id: int = 0,
                      model_kwargs: Mapping[str, Any] | None = None
                      ) -> dict[str, Array]:
  """Greedy `generate` that recomputes the whole sequence every step.

  Slow and simple, with no cache and a Python loop: the reference the
  cached decoder is tested against. Sampling options are refused.
  """
  del rng, top_k, top_p  # Greedy: the argmax ignores them.
  if temperature != 0.0:
    raise ValueError(f'generate_uncached is greedy only; got temperature='
                     f'{temperature}. Use generate() to sample.')
  total_len = _check(model, prompts, prompt_len, max_new_tokens, None, 0.0,
                     0, 1.0)
  kw = dict(model_kwargs or {})
  forward = _compiled_forward(model)
  prompts, plen = np.asarray(prompts), np.asarray(prompt_len)
  b = prompts.shape[0]
  pos = np.arange(total_len)[None]
  buf = np.full((b, total_len), pad_id, np.int32)
  buf[:, :min(prompts.shape[1], total_len)] = prompts[:, :total_len]
  buf[pos >= plen[:, None]] = pad_id
  new_tokens = np.full((b, max_new_tokens), pad_id, np.int32)
  num_new = np.zeros(b, np.int32)
  done = np.zeros(b, bool)
  while not done.all():
    logits = np.asarray(forward(params, jnp.asarray(buf), kw))
    for i in np.flatnonzero(~done):
      t = plen[i] + num_new[i]  # Where row i's next token goes.
      tok = int(logits[i, t - 1].argmax())
      buf[i, t] = new_tokens[i, num_new[i]] = tok
      num_new[i] += 1
      done[i] = tok == eos_id or num_new[i] == max_new_tokens
  return {'tokens': jnp.asarray(buf), 'new_tokens': jnp.asarray(new_tokens),
          'num_new': jnp.asarray(num_new)}


def decode_texts(new_tokens: Any, tokenizer: Any,
                 num_new: Any | None = None) -> list[str]:
  """The completions as strings; the tokenizer stops at EOS.

  With `num_new` (from `generate`) each row is cut to its length first, so
  padding never reaches the tokenizer.
  """
  rows = np.asarray(new_tokens)
  lengths = (np.full(len(rows), rows.shape[1]) if num_new is None
             else np.asarray(num_new))
  return [tokenizer.decode([int(t) for t in row[:n]])
          for row, n in zip(rows, lengths)]


@functools.lru_cache(maxsize=16)
def _compiled_step(model: nn.Module, temperature: float, top_k: int,
                   top_p: float, past_prompts: bool = False
                   ) -> Callable[..., Any]:
  """One cached decode step (cache, token, rng -> cache, next token);
  `past_prompts` as in `_decode_step`."""

  def step(params, cache, tok, rng, kw):
    logits, cache = _decode_step(model, params, cache, tok, kw, past_prompts)
    return cache, sample_logits(logits[:, -1], rng, temperature, top_k,
                                top_p)

  # The old cache is dead after each step; donating it saves a copy.
  return jax.jit(step, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _compiled_prefill(model: nn.Module) -> Callable[..., Any]:
  return jax.jit(functools.partial(_prefill, model), donate_argnums=(1,))


_compiled_skip_keys = jax.jit(_skip_keys)


def stream(model: nn.Module, params: Any, prompt: Sequence[int], *,
           max_new_tokens: int, rng: Array | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int = 2, model_kwargs: Mapping[str, Any] | None = None
           ) -> Iterator[int]:
  """Yields the completion of one prompt (BOS + tokens), token by token.

  The same cached step and random stream as `generate` on a batch of this
  one prompt, driven from Python so each token can be shown as it exists.
  EOS ends the stream and is not yielded.
  """
  prompt = np.asarray(prompt, np.int32)[None]
  plen = np.array([prompt.shape[1]], np.int32)
  _check(model, prompt, plen, max_new_tokens, rng, temperature, top_k, top_p)
  kw = dict(model_kwargs or {})
  step = _compiled_step(model, float(temperature), int(top_k), float(top_p))
  cache = jax.jit(functools.partial(_zero_cache, model))(prompt[:, :1], kw)
  rng = jax.random.key(0) if rng is None else rng
  n = prompt.shape[1] - 1  # Prefilled: all but the prompt's last token.
  if n:
    # Padded to a power of two (the cache's length at most), so that a
    # compilation serves many prompt lengths.
    width = min(max_len_of(model), 1 << (n - 1).bit_length())
    tokens = np.zeros((1, width), np.int32)
    tokens[:, :n] = prompt[:, :n]
    cache = _compiled_prefill(model)(params, cache, tokens, np.int32(n), kw)
    rng = _compiled_skip_keys(rng, np.int32(n))
  tok = prompt[:, n:]
  for i in range(max_new_tokens):
    # Split every step, exactly as `generate` does.
    rng, step_rng = jax.random.split(rng)
    cache, nxt = step(params, cache, tok, step_rng, kw)
    nxt = int(nxt[0])
    if nxt == eos_id:
      return
    yield nxt
    tok = np.array([[nxt]], np.int32)
    if i == 0 and _reads_prompt_only(model):
      # Every later token lies past the prompt: m_A is not needed.
      step = _compiled_step(model, float(temperature), int(top_k),
                            float(top_p), True)
