"""The composition over two token streams aligned by characters.

  * no anchor logit at t depends on any character after the end of anchor
    token t (the augmenting model reads a BPE of the same text);
  * with one tokenizer on both sides the aligned path computes what the
    shared path computes;
  * the per-row cache slots (decode='slots') give the full forward's logits,
    several tokens per call, rows advancing on their own.
"""

from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.data import align
from calm_jax.data import tokenizers
from calm_jax.models import composition
from calm_jax.models import transformer
from tests import fixtures

ANCHOR = transformer.DecoderConfig(vocab_size=259, d_model=32, num_layers=4,
                                   num_heads=4, d_ff=64, max_len=96)


def _noisy(params):
  """The bridges' output projections start at zero: make them write."""
  comp = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
      params['composition'])
  return {**params, 'composition': comp}


class AlignedModelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.byte = tokenizers.get_tokenizer('byte')
    cls.bpe = tokenizers.get_tokenizer(
        fixtures.train_bpe(os.path.join(tempfile.mkdtemp(), 'bpe')))

  def _model(self, aug_tok_vocab, align_mode):
    aug = transformer.DecoderConfig(vocab_size=aug_tok_vocab, d_model=16,
                                    num_layers=2, num_heads=2, d_ff=32,
                                    max_len=96)
    return composition.ComposedLM(
        ANCHOR, (composition.Augmenting('m', aug, ((0, 1), (1, 3))),),
        align=align_mode)

  def _logits(self, model, params, prompt, target, aug_tok, width=64):
    """Logits of the anchor's inputs, rows padded to one shape (one
    compile)."""
    a = align.align_example(prompt, target, self.byte, aug_tok)
    ids = [self.byte.bos_id] + self.byte.encode(prompt) + self.byte.encode(
        target)
    pad = lambda x: np.pad(np.asarray(x, np.int32), (0, width - len(x)))
    apply = jax.jit(model.apply)
    out = apply({'params': params}, jnp.asarray(pad(ids))[None],
                aug_inputs={'m': {'tokens': jnp.asarray(pad(a.ids))[None],
                                  'counts': jnp.asarray(pad(a.counts))[None]}})
    return out[0, :len(ids)]

  def test_causal_in_characters(self):
    model = self._model(self.bpe.vocab_size, 'chars')
    prompt = 'reverse: red cat =>'
    target = ' cat red héllo'
    a = align.align_example(prompt, target, self.byte, self.bpe)
    params = _noisy(model.init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
        aug_inputs={'m': {'tokens': jnp.asarray(a.ids)[None],
                          'counts': jnp.ones((1, 4), jnp.int32)}})['params'])
    full = self._logits(model, params, prompt, target, self.bpe)
    changed_later = 0.0
    # Every character of the target, then something else after it: the
    # logits up to the end of that character do not move.
    for cut in range(1, len(target)):
      for tail in ('xq z', ' dog'):
        other = target[:cut] + tail
        if other == target:
          continue
        logits = self._logits(model, params, prompt, other, self.bpe)
        n = 1 + len(self.byte.encode(prompt)) + len(
            self.byte.encode(target[:cut]))
        np.testing.assert_allclose(logits[:n], full[:n], atol=2e-5,
                                   err_msg=f'cut {cut} tail {tail!r}')
        m = min(len(logits), len(full))
        if m > n:
          changed_later = max(changed_later,
                              float(jnp.abs(logits[n:m] - full[n:m]).max()))
    # The test can fail: what comes after does move the later logits.
    self.assertGreater(changed_later, 1e-3)

  def test_one_tokenizer_is_the_shared_path(self):
    shared, aligned = (self._model(259, 'none'), self._model(259, 'chars'))
    a = align.align_example('reverse: red cat =>', ' cat red', self.byte,
                            self.byte)
    tokens = jnp.asarray(a.ids)[None]
    params = _noisy(shared.init(jax.random.key(0), tokens)['params'])
    want = shared.apply({'params': params}, tokens)
    got = aligned.apply({'params': params}, tokens, aug_inputs={
        'm': {'tokens': tokens, 'counts': jnp.asarray(a.counts)[None]}})
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(a.counts, np.arange(1, tokens.shape[1] + 1))

  def test_slots_decode_is_the_full_forward(self):
    cfg = transformer.DecoderConfig(vocab_size=50, d_model=32, num_layers=2,
                                    num_heads=4, d_ff=64, max_len=16,
                                    sliding_window=3, sliding_layers=(1,))
    model = transformer.Decoder(cfg)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 50, (2, 10)))
    params = model.init(jax.random.key(0), tokens)['params']
    full = model.apply({'params': params}, tokens)
    cache = model.init(jax.random.key(0), tokens[:, :1],
                       decode=transformer.SLOTS,
                       positions=jnp.zeros((2, 1), jnp.int32))['cache']
    # Row 0 takes 4 then 6 tokens, row 1 7 then 3; 16 = padding.
    for slots in ([[0, 1, 2, 3, 16, 16, 16], [0, 1, 2, 3, 4, 5, 6]],
                  [[4, 5, 6, 7, 8, 9], [7, 8, 9, 16, 16, 16]]):
      slots = jnp.asarray(slots)
      step = jnp.take_along_axis(tokens, jnp.minimum(slots, 9), 1)
      out, mutated = model.apply({'params': params, 'cache': cache}, step,
                                 decode=transformer.SLOTS, positions=slots,
                                 mutable=['cache'])
      cache = mutated['cache']
      for r in range(2):
        real = np.asarray(slots[r]) < 16
        np.testing.assert_allclose(
            out[r][real], full[r][np.asarray(slots[r])[real]], atol=2e-5)
    # Going back: row 0 rewrites slots 8, 9 with other tokens.
    other = jnp.asarray([[7, 8], [0, 0]])
    out, _ = model.apply({'params': params, 'cache': cache}, other,
                         decode=transformer.SLOTS,
                         positions=jnp.asarray([[8, 9], [16, 16]]),
                         mutable=['cache'])
    want = model.apply({'params': params},
                       tokens.at[0, 8:10].set(jnp.asarray([7, 8])))
    np.testing.assert_allclose(out[0], want[0, 8:10], atol=2e-5)


if __name__ == '__main__':
  absltest.main()
