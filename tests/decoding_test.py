"""Cached decoding equals recomputing the sequence; sampling options behave."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import decoding
from calm_jax.models import composition as C
from calm_jax.models import transformer as T

VOCAB, MAX_LEN, EOS = 40, 32, 2
AUG = T.DecoderConfig(vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2,
                      d_ff=32, max_len=MAX_LEN)
ANCHOR = T.DecoderConfig(vocab_size=VOCAB, d_model=32, num_layers=4,
                         num_heads=4, num_kv_heads=2, d_ff=64, max_len=MAX_LEN)


@jax.jit
def _noisy(params):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _model(kind):
  if kind == 'rope_gqa':
    model = T.Decoder(ANCHOR)
  elif kind == 'learned_layernorm':
    model = T.Decoder(T.DecoderConfig(
        vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, d_ff=64,
        max_len=MAX_LEN, position='learned', norm='layernorm', mlp='gelu'))
  else:
    model = C.ComposedLM(ANCHOR, (C.Augmenting('a', AUG, ((1, 1), (3, 3))),),
                         prompt_only=kind == 'composed_prompt_only')
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                      **_kw(model, jnp.ones((1,), jnp.int32)))['params']
  return model, _noisy(nn.meta.unbox(params))


def _kw(model, plen):
  return {'prompt_len': plen} if isinstance(model, C.ComposedLM) else {}


def _prompts(lengths, width=10, seed=0):
  rng = np.random.default_rng(seed)
  plen = np.asarray(lengths, np.int32)
  tokens = rng.integers(3, VOCAB, (len(lengths), width)).astype(np.int32)
  tokens[:, 0] = 1  # BOS.
  tokens[np.arange(width)[None] >= plen[:, None]] = 0
  return tokens, plen


class DecodingTest(parameterized.TestCase):

  @parameterized.parameters('rope_gqa', 'learned_layernorm', 'composed',
                            'composed_prompt_only')
  def test_cached_equals_uncached_greedy(self, kind):
    model, params = _model(kind)
    prompts, plen = _prompts([3, 7, 10])
    kw = _kw(model, plen)
    cached = decoding.generate(model, params, prompts, plen,
                               max_new_tokens=12, eos_id=EOS, model_kwargs=kw)
    slow = decoding.generate_uncached(model, params, prompts, plen,
                                      max_new_tokens=12, eos_id=EOS,
                                      model_kwargs=kw)
    np.testing.assert_array_equal(cached['tokens'], slow['tokens'])
    np.testing.assert_array_equal(cached['new_tokens'], slow['new_tokens'])
    # The prompt is kept as given.
    np.testing.assert_array_equal(
        np.asarray(cached['tokens'])[:, :10] * (np.arange(10) < plen[:, None]),
        prompts)

  def test_batched_rows_equal_single_rows(self):
    model, params = _model('composed')
    prompts, plen = _prompts([2, 9, 5], seed=3)
    batch = decoding.generate(model, params, prompts, plen, max_new_tokens=8,
                              model_kwargs=_kw(model, plen))
    for i in range(3):
      one = decoding.generate(model, params, prompts[i:i + 1], plen[i:i + 1],
                              max_new_tokens=8,
                              model_kwargs=_kw(model, plen[i:i + 1]))
      np.testing.assert_array_equal(batch['new_tokens'][i],
                                    one['new_tokens'][0])

  def test_eos_stops_a_row_and_pads_after_it(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([4, 4])
    free = np.asarray(decoding.generate(model, params, prompts, plen,
                                        max_new_tokens=10, eos_id=-1)
                      ['new_tokens'])
    eos = int(free[0, 3])  # Pretend the 4th generated token is EOS.
    out = decoding.generate(model, params, prompts, plen, max_new_tokens=10,
                            eos_id=eos)
    row = np.asarray(out['new_tokens'][0])
    first = int(np.argmax(row == eos))
    self.assertLessEqual(first, 3)
    self.assertTrue((row[first + 1:] == 0).all())
    self.assertEqual(int(out['num_new'][0]), first + 1)

  def test_sampling_options(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([3, 5, 6, 8])
    greedy = decoding.generate(model, params, prompts, plen,
                               max_new_tokens=10, eos_id=-1)['new_tokens']
    sample = lambda **kw: np.asarray(decoding.generate(
        model, params, prompts, plen, max_new_tokens=10, eos_id=-1,
        rng=jax.random.key(3), **kw)['new_tokens'])
    np.testing.assert_array_equal(sample(temperature=1.0),
                                  sample(temperature=1.0))
    np.testing.assert_array_equal(sample(temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(temperature=1.0, top_p=1e-6),
                                  greedy)
    hot = sample(temperature=5.0)
    self.assertGreater(float((hot != np.asarray(greedy)).mean()), 0.3)
    top3 = sample(temperature=5.0, top_k=3)
    self.assertFalse((top3 == hot).all())

  def test_stream_equals_generate(self):
    model, params = _model('composed')
    prompts, plen = _prompts([5], seed=4)
    kw = _kw(model, plen)
    whole = decoding.generate(model, params, prompts, plen, max_new_tokens=9,
                              eos_id=-1, model_kwargs=kw)
    streamed = list(decoding.stream(model, params, prompts[0, :5],
                                    max_new_tokens=9, eos_id=-1,
                                    model_kwargs=kw))
    self.assertEqual(streamed, [int(t) for t in whole['new_tokens'][0]])

  def test_bad_arguments(self):
    model, params = _model('rope_gqa')
    prompts, plen = _prompts([3, 5])
    with self.assertRaisesRegex(ValueError, r'max_len=32'):
      decoding.generate(model, params, prompts, plen, max_new_tokens=30)
    with self.assertRaisesRegex(ValueError, r'top_p'):
      decoding.generate(model, params, prompts, plen, max_new_tokens=4,
                        top_p=0.0)
    with self.assertRaisesRegex(ValueError, r'top_k'):
      decoding.generate(model, params, prompts, plen, max_new_tokens=4,
                        top_k=-1)
    with self.assertRaisesRegex(ValueError, r'temperature'):
      decoding.generate(model, params, prompts, plen, max_new_tokens=4,
                        temperature=-1.0)
    with self.assertRaisesRegex(ValueError, r'prompt_len'):
      decoding.generate(model, params, prompts, plen[:1], max_new_tokens=4)


if __name__ == '__main__':
  absltest.main()
