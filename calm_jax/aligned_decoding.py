"""Cached decoding for a composition whose models read their own tokenizers.

With `ComposedLM(..., align='chars')` each augmenting model reads the text in
its own tokenizer, and anchor input t reads augmenting token s iff
s < counts[t] (`calm_jax.data.align`: token s is *known* from the characters
the anchor has read by the end of input t). Decoding keeps one KV cache per
model and per bridge, indexed by per-row slots (`decode=SLOTS`), and at
every step, for every row:

  1. appends the newest anchor token to the text (its complete characters:
     a byte anchor may stop in the middle of a character) and re-tokenizes
     the text for each augmenting model (`align.aug_stream`);
  2. feeds the augmenting model the tokens now known to the newest anchor
     input that its cache does not hold yet;
  3. rolls back when the new text changed what was fed or read: a
     tokenizer changed a token it had already been fed, or an earlier anchor
     input's count changed (neither happens when tokens are known only once
     their word ends, as `align` has it for subword tokenizers; a tokenizer
     treated as prefix-stable when it is not does it). The augmenting
     stream goes back to the longest common prefix and is written again
     from there, and the anchor goes back to its first input whose count
     changed or that read a changed token; those anchor inputs are fed again
     in the same call, with the new counts;
  4. runs the anchor on its new inputs (one, or several after a rollback)
     and samples the next token from the newest input's logits.

Rows advance (and roll back) independently in one batched call per step; a
slot >= a model's max_len is padding. The number of new tokens per call is
padded to a power of two, so a few shapes are compiled. `generate_uncached`
is the reference: every step recomputes both models from scratch on the
text so far, with the training-mode forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import decoding
from calm_jax.data import align
from calm_jax.models import composition
from calm_jax.models import transformer

Array = jax.Array

# Fewest augmenting tokens per cached call: a word's tokens usually become
# known together, so small counts vary; one shape serves 1 to 4 of them.
_AUG_FLOOR = 4


def complete_text(tokenizer: Any, ids: Sequence[int]) -> str:
  """The text of `ids` without a trailing unfinished character.

  A byte anchor may stop in the middle of a multi-byte character, which
  decodes to one U+FFFD (the unfinished sequence: UTF-8 decoders replace a
  maximal invalid subsequence with one) until its last byte arrives; that
  one is dropped. Earlier U+FFFDs are invalid bytes, which an untrained
  model writes: they are text, read like any other character (a last one
  is read a step late, once the next token shows it is not unfinished).
  """
  text = tokenizer.decode([int(i) for i in ids])
  return text[:-1] if text.endswith('\ufffd') else text


def _bucket(n: int, floor: int = 1) -> int:
  """The smallest power of two >= max(n, floor)."""
  return 1 << (max(n, floor, 1) - 1).bit_length()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


@dataclasses.dataclass
class _Row:
  """One prompt's decoding state (host side)."""
  prompt: str
  inputs: list[int]  # Anchor inputs: [BOS] + encode(prompt) + generated.
  reads: list[int]  # Characters read by the end of each of them.
  new: list[int] = dataclasses.field(default_factory=list)  # Generated.
  done: bool = False
  # Cached decoding: how many anchor inputs the cache holds, the counts
  # each was computed with, and the ids each augmenting cache holds.
  fed: int = 0
  counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  aug_ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def append(self, anchor_tok: Any, token: int) -> None:
    """Adds a generated token (it becomes the newest anchor input)."""
    self.new.append(token)
    self.inputs.append(token)
    self.reads.append(len(self.prompt) +
                      len(complete_text(anchor_tok, self.new)))


def _model_check(model: nn.Module, aug_tokenizers: Mapping[str, Any]
                 ) -> None:
  if not isinstance(model, composition.ComposedLM):
    raise ValueError(
        'aligned_decoding decodes a composition.ComposedLM built with '
        f"align='chars'; got a {type(model).__name__}: decode it with "
        'calm_jax.decoding.generate.')
  if model.align != composition.ALIGN_CHARS:
    raise ValueError(
        f"aligned_decoding needs a ComposedLM built with align='chars'; "
        f'this one has align={model.align!r}, where every model reads the '
        "anchor's tokens: decode it with calm_jax.decoding.generate.")
  names = sorted(a.name for a in model.augmenting)
  if not isinstance(aug_tokenizers, Mapping) or sorted(
      aug_tokenizers) != names:
    got = sorted(aug_tokenizers) if isinstance(aug_tokenizers, Mapping) \
        else type(aug_tokenizers).__name__
    raise ValueError(f'aug_tokenizers must map each augmenting model '
                     f'{names} to its tokenizer; got {got}.')


def _start(model: nn.Module, prompts: Sequence[str], anchor_tokenizer: Any,
           aug_tokenizers: Mapping[str, Any], max_new_tokens: int,
           rng: Array | None, temperature: float, top_k: int, top_p: float
           ) -> list[_Row]:
  """Checks the arguments; returns each prompt's row."""
  _model_check(model, aug_tokenizers)
  if isinstance(prompts, str) or not all(isinstance(p, str)
                                         for p in prompts):
    raise ValueError('prompts must be a list of strings (one per row); got '
                     f'{type(prompts).__name__}'
                     + (f' {prompts!r}' if isinstance(prompts, str) else '')
                     + '.')
  rows = []
  for p in prompts:
    inputs = [anchor_tokenizer.bos_id] + list(anchor_tokenizer.encode(p))
    reads = align.anchor_reads(anchor_tokenizer, p, '')
    rows.append(_Row(p, inputs, [int(r) for r in reads]))
  lens = np.asarray([len(r.inputs) for r in rows], np.int32)
  width = int(lens.max()) if rows else 1
  # The plain decoder's checks: sizes and sampling options.
  decoding._check(model, np.zeros((len(rows), width), np.int32), lens,
                  max_new_tokens, rng, temperature, top_k, top_p)
  for a in model.augmenting:
    tok = aug_tokenizers[a.name]
    for i, r in enumerate(rows):
      n = len(align.aug_stream(tok, r.prompt, '')[0])
      if n > a.config.max_len:
        raise ValueError(
            f'prompts[{i}] is {n} tokens (BOS included) in the tokenizer of '
            f'augmenting model {a.name!r}, past its max_len='
            f'{a.config.max_len}; shorten the prompt.')
  return rows


def _view(model: nn.Module, row: _Row, anchor_tokenizer: Any,
          aug_tokenizers: Mapping[str, Any], max_new_tokens: int
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Each augmenting stream of the row's text so far and, for every anchor
  input, how many of its tokens it reads: ({name: ids}, {name: counts})."""
  target = complete_text(anchor_tokenizer, row.new)
  streams, counts = {}, {}
  for a in model.augmenting:
    tok = aug_tokenizers[a.name]
    ids, known = align.aug_stream(tok, row.prompt, target)
    if len(ids) > a.config.max_len:
      raise ValueError(
          f'max_new_tokens={max_new_tokens}: the text of prompt '
          f'{row.prompt[:40]!r} and {len(row.new)} new tokens is {len(ids)} '
          f'tokens in the tokenizer of augmenting model {a.name!r}, past its '
          f'max_len={a.config.max_len}. Lower max_new_tokens or shorten the '
          'prompt.')
    c = align.counts_of(known, np.asarray(row.reads, np.int64))
    if model.prompt_only:  # m_A reads the prompt's tokens only.
      c = np.minimum(c, 1 + len(tok.encode(row.prompt))).astype(np.int32)
    streams[a.name], counts[a.name] = ids, c
  return streams, counts


@functools.lru_cache(maxsize=16)
def _compiled_step(model: nn.Module) -> Callable[..., Any]:
  """One cached call: new augmenting tokens, then new anchor inputs, at
  their slots; returns the cache and the logits [b, vocab] of each row's
  input `newest`."""

  def step(params, cache, tokens, slots, aug_inputs, newest):
    logits, mutated = model.apply(
        {'params': params, 'cache': cache}, tokens, positions=slots,
        decode=transformer.SLOTS, aug_inputs=aug_inputs, mutable=['cache'])
    last = jnp.take_along_axis(logits, newest[:, None, None], 1)[:, 0]
    return mutated['cache'], last

  # The old cache is dead after each call; donating it saves a copy.
  return jax.jit(step, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _compiled_forward(model: nn.Module) -> Callable[..., Array]:
  return jax.jit(lambda params, tokens, aug_inputs: model.apply(
      {'params': params}, tokens, aug_inputs=aug_inputs))


@functools.lru_cache(maxsize=16)
def _compiled_sample(temperature: float, top_k: int, top_p: float
                     ) -> Callable[[Array, Array], Array]:
  return jax.jit(functools.partial(decoding.sample_logits,
                                   temperature=temperature, top_k=top_k,
                                   top_p=top_p))


def _zero_cache(model: nn.Module, b: int) -> Any:
  """The model's zero caches for `b` rows (shapes only: nothing runs)."""
  one = jnp.zeros((b, 1), jnp.int32)
  aug = {a.name: {'tokens': one, 'positions': one, 'counts': one}
         for a in model.augmenting}
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), one, positions=one, decode=transformer.SLOTS,
      aug_inputs=aug)['cache'])
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                shapes)


def _finish(rows: list[_Row], anchor_tokenizer: Any, stats: dict[str, Any],
            logits: list[np.ndarray] | None,
            active: list[np.ndarray] | None) -> dict[str, Any]:
  out = {'new_tokens': [list(r.new) for r in rows],
         'texts': [anchor_tokenizer.decode(r.new) for r in rows],
         'stats': stats}
  if logits is not None:
    out['logits'], out['active'] = logits, active
  return out


def _advance(rows: list[_Row], logits: Array, rng: Array, sample: Callable,
             anchor_tokenizer: Any, max_new_tokens: int) -> None:
  """Samples every row's next token; appends it to the rows still going."""
  choice = np.asarray(sample(logits, rng))
  for i, r in enumerate(rows):
    if r.done:
      continue
    tok = int(choice[i])
    r.append(anchor_tokenizer, tok)
    r.done = tok == anchor_tokenizer.eos_id or len(r.new) >= max_new_tokens


def generate(model: nn.Module, params: Any, prompts: Sequence[str], *,
             anchor_tokenizer: Any, aug_tokenizers: Mapping[str, Any],
             max_new_tokens: int, rng: Array | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             return_logits: bool = False) -> dict[str, Any]:
  """Completes text `prompts` with a `ComposedLM(align='chars')`, cached.

  Args:
    model: a `composition.ComposedLM` built with align='chars'.
    params: its parameters (unboxed).
    prompts: one string per row; the anchor reads [BOS] + its tokens.
    anchor_tokenizer: the anchor's tokenizer (byte, char or checkpoint).
    aug_tokenizers: {name: tokenizer} for every augmenting model.
    max_new_tokens: most anchor tokens to generate per row; the longest
      prompt (BOS included) plus this must fit the anchor's max_len, and
      each augmenting stream of the text its model's max_len.
    rng: key for sampling; required when temperature > 0. Each step splits
      it once, as `generate_uncached` does, so both sample the same tokens.
    temperature, top_k, top_p: as in `decoding.sample_logits`.
    return_logits: also return each step's logits (for tests).

  Returns:
    `new_tokens`: per row, the generated anchor ids (EOS included if
    emitted); `texts`: their decoded text; `stats`: `calls` (model calls),
    `aug_fed` ({name: augmenting tokens fed, re-fed ones included}),
    `rollbacks` (steps of a row that went back in any cache),
    `aug_rollbacks` ({name: steps of a row whose stream changed a token it
    had fed}) and `anchor_refed` (anchor inputs fed again). With
    `return_logits`, `logits` (per step, [b, vocab] float32 of each row's
    newest input) and `active` (per step, [b] bool: the rows whose logits
    count).
  """
  rows = _start(model, prompts, anchor_tokenizer, aug_tokenizers,
                max_new_tokens, rng, temperature, top_k, top_p)
  names = [a.name for a in model.augmenting]
  aug_len = {a.name: a.config.max_len for a in model.augmenting}
  max_len = model.anchor.max_len
  b = len(rows)
  step = _compiled_step(model)
  sample = _compiled_sample(float(temperature), int(top_k), float(top_p))
  cache = _zero_cache(model, b)
  rng = jax.random.key(0) if rng is None else rng
  stats = {'calls': 0, 'aug_fed': dict.fromkeys(names, 0), 'rollbacks': 0,
           'aug_rollbacks': dict.fromkeys(names, 0), 'anchor_refed': 0}
  all_logits = [] if return_logits else None
  all_active = [] if return_logits else None
  for r in rows:
    r.counts = {n: np.zeros(0, np.int32) for n in names}
    r.aug_ids = {n: np.zeros(0, np.int32) for n in names}
  while not all(r.done for r in rows):
    # Per row: (first anchor input to feed, {name: (first slot, ids)},
    # {name: counts of all its inputs}).
    plans = [None] * b
    for i, r in enumerate(rows):
      if r.done:
        continue
      streams, counts = _view(model, r, anchor_tokenizer, aug_tokenizers,
                              max_new_tokens)
      first = r.fed  # The newest input, or the whole prompt at first.
      feed, rolled = {}, False
      for n in names:
        ids, c = streams[n], counts[n]
        known = int(c.max())  # Tokens some anchor input reads.
        old = r.aug_ids[n]
        keep = _common_prefix(old, ids[:known])
        if keep < len(old):
          stats['aug_rollbacks'][n] += 1
          rolled = True
        feed[n] = (keep, ids[keep:known])
        prev = r.counts[n]
        # Inputs read with other counts, or that read a rewritten slot.
        stale = np.flatnonzero((c[:r.fed] != prev) | (prev > keep))
        if stale.size:
          first = min(first, int(stale[0]))
        r.aug_ids[n] = ids[:known]
        stats['aug_fed'][n] += known - keep
      stats['anchor_refed'] += r.fed - first
      stats['rollbacks'] += int(rolled or first < r.fed)
      plans[i] = (first, feed, counts)
    t = _bucket(max(len(r.inputs) - p[0] for r, p in zip(rows, plans)
                    if p is not None))
    tokens = np.zeros((b, t), np.int32)
    slots = np.full((b, t), max_len, np.int32)
    newest = np.zeros(b, np.int32)
    aug_cols = {n: _bucket(max(len(p[1][n][1]) for p in plans
                               if p is not None), _AUG_FLOOR)
                for n in names}
    aug = {n: {'tokens': np.zeros((b, aug_cols[n]), np.int32),
               'positions': np.full((b, aug_cols[n]), aug_len[n], np.int32),
               'counts': np.zeros((b, t), np.int32)} for n in names}
    for i, (r, p) in enumerate(zip(rows, plans)):
      if p is None:
        continue
      first, feed, counts = p
      k = len(r.inputs) - first
      tokens[i, :k] = r.inputs[first:]
      slots[i, :k] = np.arange(first, len(r.inputs))
      newest[i] = k - 1
      for n in names:
        start, ids = feed[n]
        aug[n]['tokens'][i, :len(ids)] = ids
        aug[n]['positions'][i, :len(ids)] = np.arange(start,
                                                      start + len(ids))
        aug[n]['counts'][i, :k] = counts[n][first:]
        r.counts[n] = counts[n]
      r.fed = len(r.inputs)
    cache, logits = step(params, cache, tokens, slots, aug, newest)
    stats['calls'] += 1
    rng, step_rng = jax.random.split(rng)
    if return_logits:
      all_logits.append(np.asarray(logits))
      all_active.append(np.asarray([p is not None for p in plans]))
    _advance(rows, logits, step_rng, sample, anchor_tokenizer,
             max_new_tokens)
  return _finish(rows, anchor_tokenizer, stats, all_logits, all_active)


def generate_uncached(model: nn.Module, params: Any, prompts: Sequence[str],
                      *, anchor_tokenizer: Any,
                      aug_tokenizers: Mapping[str, Any], max_new_tokens: int,
                      rng: Array | None = None, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0,
                      return_logits: bool = False) -> dict[str, Any]:
  """`generate` recomputed from scratch at every step: the reference.

  Each step builds, per row, the anchor inputs (prompt and tokens so far),
  each augmenting stream of the text so far and every input's counts, and
  runs the training-mode forward (no cache), padded to the models' max_len
  (one compiled shape); the next token comes from the last input's logits
  with the same random stream as `generate`. `stats` holds `calls`.
  """
  rows = _start(model, prompts, anchor_tokenizer, aug_tokenizers,
                max_new_tokens, rng, temperature, top_k, top_p)
  b, width = len(rows), model.anchor.max_len
  forward = _compiled_forward(model)
  sample = _compiled_sample(float(temperature), int(top_k), float(top_p))
  rng = jax.random.key(0) if rng is None else rng
  calls = 0
  all_logits = [] if return_logits else None
  all_active = [] if return_logits else None
  while not all(r.done for r in rows):
    tokens = np.zeros((b, width), np.int32)
    aug = {a.name: {'tokens': np.zeros((b, a.config.max_len), np.int32),
                    'counts': np.zeros((b, width), np.int32)}
           for a in model.augmenting}
    if model.prompt_only:  # Counts are capped to the prompt already.
      for v in aug.values():
        v['prompt_mask'] = np.ones_like(v['tokens'])
    last = np.zeros(b, np.int32)
    for i, r in enumerate(rows):
      if r.done:
        continue
      streams, counts = _view(model, r, anchor_tokenizer, aug_tokenizers,
                              max_new_tokens)
      tokens[i, :len(r.inputs)] = r.inputs
      last[i] = len(r.inputs) - 1
      for n, ids in streams.items():
        aug[n]['tokens'][i, :len(ids)] = ids
        aug[n]['counts'][i, :len(r.inputs)] = counts[n]
    logits = forward(params, tokens, aug)
    logits = jnp.take_along_axis(logits, jnp.asarray(last)[:, None, None],
                                 1)[:, 0]
    calls += 1
    rng, step_rng = jax.random.split(rng)
    if return_logits:
      all_logits.append(np.asarray(logits))
      all_active.append(np.asarray([not r.done for r in rows]))
    _advance(rows, logits, step_rng, sample, anchor_tokenizer,
             max_new_tokens)
  return _finish(rows, anchor_tokenizer, {'calls': calls}, all_logits,
                 all_active)
