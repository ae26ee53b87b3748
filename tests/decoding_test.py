"""Cached decoding equals recomputing the sequence; sampling options behave."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import decoding
from calm_jax.data import tokenizers
from calm_jax.models import composition as C
from calm_jax.models import transformer as T

VOCAB, MAX_LEN, EOS, PAD = 40, 32, 2, 0
WIDTH, NEW = 10, 12  # Prompt width and max_new_tokens of most tests.
AUG = T.DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                      d_ff=32, max_len=MAX_LEN)
ANCHOR = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, d_ff=64, max_len=MAX_LEN)
# Gemma-style: the first layer attends to a sliding window of 3 tokens.
SLIDING = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=2,
                          num_heads=4, d_ff=64, max_len=MAX_LEN,
                          sliding_layers=(0,), sliding_window=3)
LEARNED = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=2,
                          num_heads=4, d_ff=64, max_len=MAX_LEN,
                          position='learned', norm='layernorm', mlp='gelu',
                          tie_embeddings=False)


def _random_params(shapes):
  """Random weights for `shapes`, drawn on the host so nothing compiles.

  Every leaf is random, the bridges' zero-initialised output projections
  too, so the composition really changes the logits.
  """
  rng = np.random.default_rng(7)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if x.ndim > 1:  # Fan-in scaling keeps the activations O(1).
      return jnp.asarray(noise * np.prod(x.shape[:-1]) ** -0.5)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray(float(is_scale) + 0.3 * noise)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _model(kind):
  if kind == 'rope_gqa':
    model = T.Decoder(ANCHOR)
  elif kind == 'learned_layernorm':
    model = T.Decoder(LEARNED)
  elif kind == 'sliding':
    model = T.Decoder(SLIDING)
  else:
    pairs = C.select_pairs(AUG.num_layers, ANCHOR.num_layers, 1)
    if kind in ('composed_embeddings', 'composed_content_free'):
      pairs += ((0, -1),)
    ours = {}
    if kind in ('composed_recency', 'composed_embeddings'):
      ours = dict(recency_bias=True)
    elif kind == 'composed_content_free':
      ours = dict(recency_bias=True, recency_max_slope=8.0,
                  anchor_queries=False, proj_hidden=16, gate=True,
                  source_gate=True, anchor_gate=True)
    bridge = (C.BridgeConfig.make('ours', options=ours) if ours
              else C.BridgeConfig())
    model = C.ComposedLM(ANCHOR, (C.Augmenting('a', AUG, pairs),),
                         prompt_only=kind == 'composed_prompt_only',
                         bridge=bridge)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32),
      **_kw(model, jnp.ones((1,), jnp.int32)))['params']))
  return model, _random_params(shapes)


def _kw(model, plen):
  return {'prompt_len': plen} if isinstance(model, C.ComposedLM) else {}


def _prompts(lengths, width=WIDTH, seed=0):
  """Right-padded BOS + random prompts; the padding is junk on purpose."""
  rng = np.random.default_rng(seed)
  plen = np.asarray(lengths, np.int32)
  tokens = rng.integers(3, VOCAB, (len(lengths), width)).astype(np.int32)
  tokens[:, 0] = 1  # BOS.
  return tokens, plen


def _clean(prompts, plen):
  return np.where(np.arange(prompts.shape[1]) < plen[:, None], prompts, PAD)


class DecodingTest(parameterized.TestCase):

  @parameterized.parameters('rope_gqa', 'learned_layernorm', 'sliding',
                            'composed', 'composed_prompt_only',
                            'composed_recency', 'composed_embeddings',
                            'composed_content_free')
  def test_cached_equals_uncached_greedy(self, kind):
    model, params = _model(kind)
    prompts, plen = _prompts([3, 7, 10])
    kw = _kw(model, plen)
    cached = jax.device_get(decoding.generate(
        model, params, prompts, plen, max_new_tokens=NEW, eos_id=EOS,
        model_kwargs=kw))
    slow = jax.device_get(decoding.generate_uncached(
        model, params, prompts, plen, max_new_tokens=NEW, eos_id=EOS,
        model_kwargs=kw))
    self.assertEqual(cached['tokens'].shape, (3, WIDTH + NEW))
    self.assertEqual(cached['new_tokens'].shape, (3, NEW))
    for key in ('tokens', 'new_tokens', 'num_new'):
      self.assertEqual(cached[key].dtype, np.int32)
      np.testing.assert_array_equal(cached[key], slow[key], err_msg=key)
    # The prompt is kept (its junk padding is not), the completion follows.
    tokens = cached['tokens']
    np.testing.assert_array_equal(
        tokens[:, :WIDTH] * (np.arange(WIDTH) < plen[:, None]),
        _clean(prompts, plen))
    for i in range(3):
      np.testing.assert_array_equal(
          tokens[i, plen[i]:plen[i] + NEW], cached['new_tokens'][i])
      self.assertTrue((tokens[i, plen[i] + NEW:] == PAD).all())

  @parameterized.parameters('sliding', 'composed_recency',
                            'composed_content_free')
  def test_cache_takes_chunks(self, kind):
    # Any split of a sequence into decode calls (a prefill, then steps or
    # more chunks) gives the logits of one forward pass over all of it:
    # a sliding window and grouped-query heads (the composed models'
    # anchor), bridges with a recency bias or caching values only.
    model, params = _model(kind)
    tokens, plen = _prompts([6, 9], width=14, seed=5)
    kw = _kw(model, plen)
    whole = decoding._compiled_forward(model)(params, tokens, kw)
    call = jax.jit(lambda cache, tok: model.apply(
        {'params': params, 'cache': cache}, tok, decode=True,
        mutable=['cache'], **kw))
    cache = decoding._zero_cache(model, tokens[:, :1], kw)
    chunks, at = [], 0
    for size in (5, 1, 4, 1, 3):
      logits, mutated = call(cache, tokens[:, at:at + size])
      cache, at = mutated['cache'], at + size
      chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, 1), whole, atol=2e-5,
                               rtol=2e-5)

  @parameterized.parameters('rope_gqa', 'composed_recency')
  def test_generate_prefills_the_shortest_prompt(self, kind):
    # Rows of one length, of which the shortest is 1 (no prefill), and a
    # batch-wide prefill: the same completions as the reference.
    model, params = _model(kind)
    for lengths in ([10, 10], [1, 6], [8, 9, 4]):
      prompts, plen = _prompts(lengths, seed=len(lengths))
      kw = _kw(model, plen)
      cached = decoding.generate(model, params, prompts, plen,
                                 max_new_tokens=NEW, eos_id=-1,
                                 model_kwargs=kw)
      slow = decoding.generate_uncached(model, params, prompts, plen,
                                        max_new_tokens=NEW, eos_id=-1,
                                        model_kwargs=kw)
      np.testing.assert_array_equal(cached['tokens'], slow['tokens'],
                                    err_msg=str(lengths))

  def test_content_free_bridges_cache_values_only(self):
    for kind, has_keys in (('composed_embeddings', True),
                           ('composed_content_free', False)):
      model, _ = _model(kind)
      cache = jax.eval_shape(lambda m=model: m.init(
          jax.random.key(0), jnp.ones((2, 1), jnp.int32), decode=True,
          prompt_len=jnp.ones((2,), jnp.int32))['cache'])
      bridges = cache['composition']
      self.assertNotEmpty(bridges)
      for name, c in bridges.items():
        self.assertIn('cached_value', c, name)
        self.assertEqual('cached_key' in c, has_keys, (kind, name))

  def test_prompt_only_changes_the_completion(self):
    # Guards the model_kwargs plumbing: the flag must reach the bridges.
    prompts, plen = _prompts([3, 7, 10])
    outs = []
    for kind in ('composed', 'composed_prompt_only'):
      model, params = _model(kind)
      outs.append(np.asarray(decoding.generate(
          model, params, prompts, plen, max_new_tokens=NEW, eos_id=EOS,
          model_kwargs=_kw(model, plen))['tokens']))
    self.assertFalse((outs[0] == outs[1]).all())

  @parameterized.parameters('rope_gqa', 'composed_prompt_only')
  def test_batched_rows_equal_single_rows(self, kind):
    model, params = _model(kind)
    prompts, plen = _prompts([2, 9, 5], seed=3)
    batch = decoding.generate(model, params, prompts, plen,
                              max_new_tokens=NEW,
                              model_kwargs=_kw(model, plen))
    for i in range(3):
      one = decoding.generate(model, params, prompts[i:i + 1], plen[i:i + 1],
                              max_new_tokens=NEW,
                              model_kwargs=_kw(model, plen[i:i + 1]))
      for key in ('tokens', 'new_tokens', 'num_new'):
        np.testing.assert_array_equal(batch[key][i], one[key][0])

  def test_eos_stops_a_row_and_pads_after_it(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([3, 7, 10])
    free = jax.device_get(decoding.generate(
        model, params, prompts, plen, max_new_tokens=NEW, eos_id=-1))
    np.testing.assert_array_equal(free['num_new'], [NEW] * 3)
    eos = int(free['new_tokens'][0, 3])  # Row 0's 4th new token is "EOS".
    # pad_id 39 tells padding from a generated 0.
    out = jax.device_get(decoding.generate(
        model, params, prompts, plen, max_new_tokens=NEW, eos_id=eos,
        pad_id=39))
    for i in range(3):
      row = free['new_tokens'][i]
      n = int(np.argmax(row == eos)) + 1 if (row == eos).any() else NEW
      self.assertEqual(int(out['num_new'][i]), n)
      np.testing.assert_array_equal(out['new_tokens'][i, :n], row[:n])
      self.assertTrue((out['new_tokens'][i, n:] == 39).all())
      self.assertTrue((out['tokens'][i, plen[i] + n:] == 39).all())
    self.assertLessEqual(int(out['num_new'][0]), 4)
    self.assertEqual(out['new_tokens'][0, int(out['num_new'][0]) - 1], eos)
    # The slow reference agrees, and the ids compiled nothing new.
    slow = decoding.generate_uncached(model, params, prompts, plen,
                                      max_new_tokens=NEW, eos_id=eos,
                                      pad_id=39)
    for key in ('tokens', 'new_tokens', 'num_new'):
      np.testing.assert_array_equal(out[key], slow[key], err_msg=key)

  def test_one_compilation_per_shape(self):
    model, params = _model('rope_gqa')
    run = lambda seed, **kw: decoding.generate(
        model, params, *_prompts([4, 6, 2], seed=seed), max_new_tokens=NEW,
        **kw)
    run(0)
    fn = decoding._compiled_generate(model, WIDTH + NEW, NEW, 0.0, 0, 1.0)
    before = fn._cache_size()
    run(1)
    run(2, eos_id=5, pad_id=7)
    self.assertEqual(fn._cache_size(), before)

  def test_sample_logits_filters(self):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draw = lambda **kw: set(np.asarray(decoding.sample_logits(
        logits, jax.random.key(0), 1.0, **kw)).tolist())
    self.assertEqual(draw(top_k=0, top_p=1.0), {0, 1, 2, 3})
    self.assertEqual(draw(top_k=2, top_p=1.0), {0, 1})
    self.assertEqual(draw(top_k=0, top_p=0.7), {0, 1})
    self.assertEqual(draw(top_k=0, top_p=0.5), {0})
    self.assertEqual(draw(top_k=0, top_p=0.81), {0, 1, 2})
    self.assertEqual(draw(top_k=2, top_p=0.7), {0, 1})
    self.assertEqual(draw(top_k=100, top_p=1.0), {0, 1, 2, 3})  # k > vocab.

  def test_sampling_options(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([3, 7, 10])
    greedy = np.asarray(decoding.generate(
        model, params, prompts, plen, max_new_tokens=NEW,
        eos_id=-1)['new_tokens'])
    sample = lambda seed=3, **kw: np.asarray(decoding.generate(
        model, params, prompts, plen, max_new_tokens=NEW, eos_id=-1,
        rng=jax.random.key(seed), **kw)['tokens'])
    hot = sample(temperature=5.0)
    np.testing.assert_array_equal(hot, sample(temperature=5.0))
    self.assertFalse((hot == sample(seed=4, temperature=5.0)).all())
    new = lambda x: np.stack([x[i, p:p + NEW] for i, p in enumerate(plen)])
    np.testing.assert_array_equal(new(sample(temperature=5.0, top_k=1)),
                                  greedy)
    np.testing.assert_array_equal(new(sample(temperature=5.0, top_p=1e-6)),
                                  greedy)
    # Near-uniform over 40 tokens: agreeing with greedy is rare.
    self.assertGreater(float((new(hot) != greedy).mean()), 0.5)
    # Every token drawn with top_k=3 is among the 3 likeliest there.
    top3 = sample(temperature=5.0, top_k=3)
    self.assertFalse((top3 == hot).all())
    logits = np.asarray(decoding._compiled_forward(model)(params, top3, {}))
    for i, p in enumerate(plen):
      step_logits = logits[i, p - 1:p - 1 + NEW]
      chosen = np.take_along_axis(step_logits, top3[i, p:p + NEW, None], 1)
      self.assertTrue(((step_logits > chosen).sum(1) < 3).all())

  def test_prompt_only_skips_m_a_past_the_prompts(self):
    # Past every prompt no bridge reads m_A: the step without it gives the
    # same logits and leaves m_A's cache where the prompt left it.
    model, params = _model('composed_prompt_only')
    tokens, plen = _prompts([4, 6], width=8, seed=2)
    kw = _kw(model, plen)
    cache = decoding._zero_cache(model, tokens[:, :1], kw)
    _, mutated = model.apply({'params': params, 'cache': cache},
                             tokens[:, :7], decode=True, mutable=['cache'],
                             **kw)
    tok = tokens[:, 7:8]
    full, full_cache = decoding._decode_step(model, params, mutated['cache'],
                                             tok, kw)
    skip, skip_cache = decoding._decode_step(model, params, mutated['cache'],
                                             tok, kw, True)
    np.testing.assert_allclose(skip, full, atol=2e-5, rtol=2e-5)
    index = lambda c, m: int(c[m]['decode_position']['index'])
    self.assertEqual(index(full_cache, 'aug_a'), 8)
    self.assertEqual(index(skip_cache, 'aug_a'), 7)  # m_A did not run.
    self.assertEqual(index(skip_cache, 'anchor'), 8)

  @parameterized.parameters(
      dict(kind='composed', temperature=0.0),
      dict(kind='composed_prompt_only', temperature=0.0),
      dict(kind='rope_gqa', temperature=2.0))
  def test_stream_equals_generate(self, kind, temperature):
    model, params = _model(kind)
    prompts, plen = _prompts([5], seed=4)
    kw = _kw(model, plen)
    rng = jax.random.key(11)
    whole = decoding.generate(model, params, prompts, plen, max_new_tokens=9,
                              eos_id=-1, model_kwargs=kw, rng=rng,
                              temperature=temperature)
    streamed = list(decoding.stream(
        model, params, prompts[0, :5], max_new_tokens=9, eos_id=-1,
        model_kwargs=kw, rng=rng, temperature=temperature))
    self.assertEqual(streamed, [int(t) for t in whole['new_tokens'][0]])

  def test_decode_texts(self):
    tok = tokenizers.ByteTokenizer()
    ids = np.array([tok.encode('ab') + [tok.eos_id, 5],
                    tok.encode('xyz') + [tok.pad_id]], np.int32)
    self.assertEqual(decoding.decode_texts(ids, tok), ['ab', 'xyz'])
    self.assertEqual(decoding.decode_texts(ids, tok, num_new=[1, 2]),
                     ['a', 'xy'])

  def test_bad_arguments(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([3, 5])
    bad = {
        r'max_new_tokens=28.*max_len=32': dict(max_new_tokens=28),
        r'max_new_tokens must be a positive': dict(max_new_tokens=0),
        r'top_p': dict(top_p=0.0),
        r'top_p .*1\.5': dict(top_p=1.5),
        r'top_k': dict(top_k=-1),
        r'temperature': dict(temperature=-1.0),
        r'rng=': dict(temperature=1.0),
        r'prompt_len .*\[batch\]': dict(prompt_len=plen[:1]),
        r'prompt_len must be in \[1, 10\]': dict(prompt_len=plen * 0),
        r'prompt_len must be in \[1, 10\].*11': dict(prompt_len=plen + 8),
        r'prompts must be int \[batch': dict(prompts=prompts[0]),
        r'prompts must hold integer': dict(prompts=prompts * 1.0),
    }
    for regex, kw in bad.items():
      args = {'prompts': prompts, 'prompt_len': plen, 'max_new_tokens': 4,
              **kw}
      with self.subTest(regex), self.assertRaisesRegex(ValueError, regex):
        decoding.generate(model, params, **args)
    # The longest real prompt counts, not the padded width.
    out = decoding.generate(model, params, prompts, plen, max_new_tokens=27)
    self.assertEqual(out['tokens'].shape, (2, MAX_LEN))
    with self.assertRaisesRegex(ValueError, 'greedy only'):
      decoding.generate_uncached(model, params, prompts, plen,
                                 max_new_tokens=4, temperature=1.0)


if __name__ == '__main__':
  absltest.main()
