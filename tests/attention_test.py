"""The attention kernels agree with the XLA path, and `auto` picks by platform.

cuDNN and splash run only on GPUs and TPUs; here the same calls are checked
for numerics on CPU: the cuDNN path through jax.nn.dot_product_attention's
XLA implementation (the argument mapping: scale, causality, the window,
grouped heads), and splash in Pallas' interpreter.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models import attention
from calm_jax.models import transformer


def _qkv(b=2, t=128, h=4, kv=2, d=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, d)),
          jax.random.normal(ks[1], (b, t, kv, d)),
          jax.random.normal(ks[2], (b, t, kv, d)))


def _reference(q, k, v, *, scale, window=0, softcap=None, segment_ids=None):
  mask = transformer.causal_mask(q.shape[1], segment_ids, window)
  return transformer.dot_product_attention(q, k, v, mask, softcap, scale)


class KernelsTest(parameterized.TestCase):

  @parameterized.parameters(0, 16)
  def test_cudnn_call_matches_xla(self, window):
    q, k, v = _qkv()
    scale = 0.3
    got = attention.cudnn(q, k, v, scale=scale, window=window,
                          implementation='xla')
    np.testing.assert_allclose(
        got, _reference(q, k, v, scale=scale, window=window), atol=2e-5)

  @parameterized.named_parameters(
      ('causal', 0, None, False), ('window', 16, None, False),
      ('softcap', 0, 5.0, False), ('packed', 0, None, True),
      ('packed_window_softcap', 24, 5.0, True))
  def test_splash_matches_xla(self, window, softcap, packed):
    q, k, v = _qkv()
    ids = None
    if packed:  # Three documents and padding, differently in each row.
      ids = jnp.asarray([[1] * 40 + [2] * 30 + [3] * 50 + [0] * 8,
                         [1] * 70 + [2] * 58])
    scale = 32 ** -0.5
    got = attention.splash(q, k, v, scale=scale, window=window,
                           softcap=softcap, segment_ids=ids, interpret=True)
    np.testing.assert_allclose(
        got, _reference(q, k, v, scale=scale, window=window, softcap=softcap,
                        segment_ids=ids), atol=2e-5)

  def test_a_decoder_on_splash_gives_the_xla_logits(self):
    cfg = transformer.DecoderConfig(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
        d_ff=64, max_len=128, attention='xla')
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 64)
    ids = jnp.asarray([[1] * 60 + [2] * 68, [1] * 128])
    pos = jnp.asarray([list(range(60)) + list(range(68)), list(range(128))])
    model = transformer.Decoder(cfg)
    params = model.init(jax.random.key(0), tokens)['params']
    want = model.apply({'params': params}, tokens, positions=pos,
                       segment_ids=ids)
    splash = transformer.Decoder(
        transformer.DecoderConfig(**{**cfg.to_dict(), 'attention': 'splash'}))
    got = splash.apply({'params': params}, tokens, positions=pos,
                       segment_ids=ids)
    np.testing.assert_allclose(got, want, atol=1e-4)


class CausalBlocksTest(parameterized.TestCase):
  """The XLA path's block-causal form: the same outputs and gradients."""

  def test_block_counts(self):
    blocks = transformer._causal_blocks  # pylint: disable=protected-access
    self.assertEqual(blocks(256, 256), 4)
    self.assertEqual(blocks(2048, 2048), 8)
    self.assertEqual(blocks(64, 64), 1)  # Too short to gain.
    self.assertEqual(blocks(256, 512), 1)  # A cache: not self-attention.
    self.assertEqual(blocks(200, 200), 1)  # No whole blocks of 64.

  @parameterized.parameters((0, None, False, False), (16, None, True, False),
                            (0, 30.0, False, True))
  def test_matches_the_whole_matrix(self, window, softcap, packed, bias):
    q, k, v = _qkv(t=256, h=4, kv=4, d=16)
    segment_ids = (jnp.asarray(np.repeat([[1, 2, 2, 0]], 64, 1).repeat(2, 0))
                   if packed else None)
    mask = transformer.causal_mask(256, segment_ids, window)
    extra = (0.1 * jax.random.normal(jax.random.key(3), (1, 4, 256, 256))
             if bias else None)

    def loss(q, k, v, causal):
      out = transformer.dot_product_attention(
          q, k, v, mask, softcap, bias=extra, causal=causal)
      return jnp.sum(out * jnp.cos(out)), out

    grads = {}
    for causal in (False, True):
      (_, out), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
          q, k, v, causal)
      grads[causal] = (out, *g)
    for whole, blocked in zip(grads[False], grads[True]):
      np.testing.assert_allclose(blocked, whole, atol=2e-5, rtol=2e-5)


class ChooseTest(absltest.TestCase):

  def choose(self, requested, platform, dtype=jnp.bfloat16, length=256,
             softcap=None, segment_ids=None):
    return attention.choose(requested, platform=platform, dtype=dtype,
                            length=length, softcap=softcap,
                            segment_ids=segment_ids)

  def test_auto_by_platform(self):
    self.assertEqual(self.choose('auto', 'cpu'), 'xla')
    self.assertEqual(self.choose('auto', 'gpu'), 'cudnn')
    self.assertEqual(self.choose('auto', 'tpu'), 'splash')
    self.assertEqual(self.choose('auto', 'tpu', segment_ids=jnp.ones(2),
                                 softcap=50.0), 'splash')

  def test_auto_falls_back_with_one_line(self):
    with self.assertLogs(level='INFO') as logs:
      self.assertEqual(self.choose('auto', 'gpu', dtype=jnp.float32), 'xla')
      self.assertEqual(self.choose('auto', 'gpu', dtype=jnp.float32), 'xla')
    self.assertLen([l for l in logs.output if 'float32' in l], 1)
    self.assertEqual(self.choose('auto', 'gpu', segment_ids=jnp.ones(2)),
                     'xla')
    self.assertEqual(self.choose('auto', 'gpu', softcap=50.0), 'xla')
    self.assertEqual(self.choose('auto', 'tpu', length=100), 'xla')

  def test_an_explicit_kernel_that_cannot_run_is_an_error(self):
    with self.assertRaisesRegex(ValueError, r"attention='cudnn': cuDNN runs "
                                r'on GPUs only, and this is cpu'):
      self.choose('cudnn', 'cpu')
    with self.assertRaisesRegex(ValueError, r"attention='splash': splash "
                                r'attention takes whole 128-token blocks'):
      self.choose('splash', 'tpu', length=100)
    with self.assertRaisesRegex(ValueError, r"attention='flash' is not"):
      self.choose('flash', 'gpu')
    with self.assertRaisesRegex(ValueError, r'm\.attention: unknown kernel'):
      transformer.DecoderConfig(vocab_size=8, d_model=8, num_layers=1,
                                num_heads=1, d_ff=8,
                                attention='flash').validate('m')


if __name__ == '__main__':
  absltest.main()
