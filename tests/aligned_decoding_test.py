"""Aligned decoding (calm_jax/aligned_decoding.py): the cached decoder of a
ComposedLM(align='chars') against the reference that recomputes both models
from the text at every step.

Tiny random models: a byte anchor and an augmenting model on a byte-level
BPE or a SentencePiece tokenizer. The bridges' output projections start at
zero, so the composition's parameters get noise (the augmenting model then
changes the anchor's logits). The anchor's unembedding is cut down to a few
letters, a space and the bytes of 'é', so that the random model writes
words (whose subword tokens become known at the space) and stops in the
middle of a character now and then.
"""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import aligned_decoding
from calm_jax.data import align
from calm_jax.data import tokenizers
from calm_jax.models import composition
from calm_jax.models import transformer
from tests import fixtures

ANCHOR = transformer.DecoderConfig(
    vocab_size=259, d_model=32, num_layers=2, num_heads=4, d_ff=64,
    max_len=64, tie_embeddings=False)
PROMPTS = ['reverse: red cat =>', 'héllo wörld', 'blue dog']
NEW = 12


def _sentencepiece(directory: str) -> str:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(directory, 'corpus.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(r['prompt'] + r['completion']
                      for r in fixtures.reverse_task(200)))
  sentencepiece.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(directory, 'tokenizer'),
      vocab_size=300, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
      byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
  return directory


def _model(aug_tok, align_mode: str = 'chars', aug_len: int = 64,
           prompt_only: bool = False) -> composition.ComposedLM:
  aug = transformer.DecoderConfig(
      vocab_size=aug_tok.vocab_size, d_model=16, num_layers=2, num_heads=2,
      d_ff=32, max_len=aug_len)
  return composition.ComposedLM(
      ANCHOR, (composition.Augmenting('m', aug, ((0, 0), (1, 1))),),
      align=align_mode, prompt_only=prompt_only)


def _params(model: composition.ComposedLM, letters: str, seed: int = 4):
  """Random params (numpy: initialising under jit compiles for seconds),
  the bridges' nonzero, the anchor writing only `letters`."""
  one = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), one,
      aug_inputs={'m': {'tokens': one, 'counts': one}})['params']))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:  # Norms.
      return np.ones(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:2 if "['out']" in name else 1])
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        np.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  allowed = np.zeros(ANCHOR.vocab_size, bool)
  allowed[tokenizers.ByteTokenizer().encode(letters)] = True
  w = params['anchor']['unembedding']
  params['anchor']['unembedding'] = np.where(allowed, 4 * w, 0.0)
  return params


class AlignedDecodingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.byte = tokenizers.get_tokenizer('byte')
    cls.bpe = tokenizers.get_tokenizer(fixtures.train_bpe(tempfile.mkdtemp()))
    cls.sp = tokenizers.get_tokenizer(_sentencepiece(tempfile.mkdtemp()))
    cls.models = {'bpe': _model(cls.bpe), 'sp': _model(cls.sp)}
    cls.params = {k: _params(m, 'ab é') for k, m in cls.models.items()}

  def _both(self, kind: str, params=None, **kw):
    model, tok = self.models[kind], getattr(self, kind)
    args = dict(anchor_tokenizer=self.byte, aug_tokenizers={'m': tok},
                max_new_tokens=NEW, return_logits=True, **kw)
    params = self.params[kind] if params is None else params
    cached = aligned_decoding.generate(model, params, PROMPTS, **args)
    ref = aligned_decoding.generate_uncached(model, params, PROMPTS, **args)
    return cached, ref

  def _prompt_tokens(self, kind: str) -> int:
    tok = getattr(self, kind)
    return sum(len(align.aug_stream(tok, p, '')[0]) for p in PROMPTS)

  def _assert_same(self, cached, ref):
    self.assertEqual(cached['new_tokens'], ref['new_tokens'])
    self.assertEqual(cached['texts'], ref['texts'])
    for row in cached['new_tokens']:
      self.assertBetween(len(row), 1, NEW)

  def test_greedy_matches_the_reference_bpe(self):
    cached, ref = self._both('bpe')
    self._assert_same(cached, ref)
    stats = cached['stats']
    self.assertEqual(stats['calls'], NEW)
    # Words were generated: their tokens were fed past the prompts'.
    self.assertGreater(stats['aug_fed']['m'], self._prompt_tokens('bpe'))
    self.assertEqual(stats['rollbacks'], 0)  # Finished words never change.
    self.assertIn(' ', ''.join(cached['texts']))
    # The anchor wrote 'é' byte by byte: a step ended inside a character.
    self.assertIn('é', ''.join(cached['texts']))

  def test_greedy_matches_the_reference_sentencepiece(self):
    cached, ref = self._both('sp')
    self._assert_same(cached, ref)
    self.assertGreater(cached['stats']['aug_fed']['m'],
                       self._prompt_tokens('sp'))

  def test_sampling_matches_the_reference(self):
    for kind in ('bpe', 'sp'):
      cached, ref = self._both(kind, temperature=1.0,
                               rng=jax.random.key(7))
      self._assert_same(cached, ref)
      greedy = aligned_decoding.generate(
          self.models[kind], self.params[kind], PROMPTS,
          anchor_tokenizer=self.byte, aug_tokenizers={'m': getattr(
              self, kind)}, max_new_tokens=NEW)
      self.assertNotEqual(cached['new_tokens'], greedy['new_tokens'])

  def test_logits_match_the_reference_at_every_step(self):
    for kind in ('bpe', 'sp'):
      cached, ref = self._both(kind)
      self.assertLen(cached['logits'], NEW)
      self.assertLen(ref['logits'], NEW)
      for step, (a, b, on, on_ref) in enumerate(zip(
          cached['logits'], ref['logits'], cached['active'],
          ref['active'])):
        np.testing.assert_array_equal(on, on_ref)
        scale = max(1.0, float(np.abs(b[on]).max()))
        np.testing.assert_allclose(a[on], b[on], rtol=0, atol=1e-5 * scale,
                                   err_msg=f'{kind} step {step}')
    # The bridges matter: the anchor alone gives other logits.
    params = dict(self.params['bpe'])
    params['composition'] = jax.tree_util.tree_map(
        np.zeros_like, params['composition'])
    alone, _ = self._both('bpe', params=params)
    self.assertGreater(
        float(np.abs(alone['logits'][0] - cached['logits'][0]).max()), 1e-3)

  def test_an_unstable_tokenizer_rolls_back(self):
    # BPE tokens known at their own end: a token fed as soon as its
    # characters are read merges with the next character into another
    # token, and both caches go back.
    tok = self.bpe
    spans = align.spans(tok, 'red')
    with mock.patch.object(align, 'prefix_stable', lambda t: True):
      np.testing.assert_array_equal(
          align.known_ends(tok, 'red', spans.ceil, complete=False),
          spans.ceil)
      cached, ref = self._both(
          'bpe', params=_params(self.models['bpe'], 'red cat '))
    self.assertGreater(
        align.known_ends(tok, 'red', spans.ceil, complete=False)[-1],
        len('red'))  # Unpatched: known only once the word ends.
    self._assert_same(cached, ref)
    stats = cached['stats']
    self.assertGreaterEqual(stats['aug_rollbacks']['m'], 1)
    self.assertGreaterEqual(stats['rollbacks'], 1)
    self.assertGreaterEqual(stats['anchor_refed'], 1)
    for a, b, on in zip(cached['logits'], ref['logits'], cached['active']):
      np.testing.assert_allclose(a[on], b[on], rtol=0, atol=1e-4)

  def test_prompt_only_reads_the_prompts_tokens(self):
    model = _model(self.bpe, prompt_only=True)
    args = dict(anchor_tokenizer=self.byte, aug_tokenizers={'m': self.bpe},
                max_new_tokens=6)
    cached = aligned_decoding.generate(model, self.params['bpe'], PROMPTS,
                                       **args)
    ref = aligned_decoding.generate_uncached(model, self.params['bpe'],
                                             PROMPTS, **args)
    self.assertEqual(cached['new_tokens'], ref['new_tokens'])
    self.assertEqual(cached['stats']['aug_fed']['m'],
                     self._prompt_tokens('bpe'))

  def test_a_stream_past_the_augmenting_max_len_is_refused(self):
    # The prompt fits; its text with the generated words does not.
    room = len(align.aug_stream(self.bpe, 'blue dog', '')[0]) + 2
    model = _model(self.bpe, aug_len=room)
    with self.assertRaisesRegex(
        ValueError, r"max_new_tokens=12: the text of prompt 'blue dog' and "
        rf"\d+ new tokens is {room + 1} tokens .* augmenting model 'm', past "
        rf'its max_len={room}\. Lower max_new_tokens'):
      aligned_decoding.generate(
          model, self.params['bpe'], ['blue dog'],
          anchor_tokenizer=self.byte, aug_tokenizers={'m': self.bpe},
          max_new_tokens=NEW)

  def test_refuses_an_unaligned_model_and_bad_arguments(self):
    args = dict(anchor_tokenizer=self.byte, aug_tokenizers={'m': self.bpe},
                max_new_tokens=4)
    model = _model(self.bpe, 'none')
    for fn in (aligned_decoding.generate,
               aligned_decoding.generate_uncached):
      with self.assertRaisesRegex(
          ValueError, r"align='chars'.*align='none'.*decoding\.generate"):
        fn(model, {}, PROMPTS, **args)
    model, params = self.models['bpe'], self.params['bpe']
    cases = [
        (dict(args, max_new_tokens=0), r'max_new_tokens must be a positive'),
        (dict(args, max_new_tokens=60), r'max_new_tokens=60.*max_len=64'),
        (dict(args, aug_tokenizers={'x': self.bpe}),
         r"aug_tokenizers must map each augmenting model \['m'\]"),
        (dict(args, temperature=1.0), r'pass rng=jax\.random\.key'),
    ]
    for kw, msg in cases:
      with self.assertRaisesRegex(ValueError, msg):
        aligned_decoding.generate(model, params, PROMPTS, **kw)
    with self.assertRaisesRegex(ValueError, r'prompts must be a list'):
      aligned_decoding.generate(model, params, 'one prompt', **args)
    # A prompt longer than the augmenting model's max_len, in its tokens.
    short = _model(self.bpe, aug_len=8)
    with self.assertRaisesRegex(
        ValueError, r"prompts\[1\] is 14 tokens .* augmenting model 'm', "
        r'past its max_len=8'):
      aligned_decoding.generate(short, params, PROMPTS, **args)


if __name__ == '__main__':
  absltest.main()
