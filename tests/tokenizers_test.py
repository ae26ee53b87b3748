"""Tokenizers from checkpoint directories: special ids, fingerprints,
what `data.tokenizer` resolves to. Needs `tokenizers` and `sentencepiece`
(install requirements), no torch."""

import json
import os
import tempfile

from absl.testing import absltest

from calm_jax.data import tokenizers
from tests import fixtures


class CheckpointTokenizerTest(absltest.TestCase):
  """A checkpoint directory's tokenizer.json or tokenizer.model."""

  def _word_level(self, path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, 'a': 3, 'b': 4, 'ab': 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<pad>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, 'tokenizer.json'))

  def test_tokenizer_json(self):
    path = tempfile.mkdtemp()
    self._word_level(path)
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump({'bos_token': '<s>', 'eos_token': '</s>',
                 'pad_token': '<pad>'}, f)
    t = tokenizers.CheckpointTokenizer(path)
    self.assertEqual((t.pad_id, t.bos_id, t.eos_id, t.vocab_size),
                     (0, 1, 2, 6))
    self.assertEqual(t.encode('ab a b'), [5, 3, 4])
    self.assertEqual(t.decode([5, 3, 2, 4]), 'ab a')

  def test_special_ids_from_config_json_and_pad_falls_back_to_eos(self):
    path = tempfile.mkdtemp()
    self._word_level(path)
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump({'bos_token_id': 1, 'eos_token_id': [2, 5]}, f)
    t = tokenizers.CheckpointTokenizer(path)
    self.assertEqual((t.pad_id, t.bos_id, t.eos_id), (2, 1, 2))
    self.assertEqual(t.decode([0, 3]), '<pad> a')  # Id 0 is text here.
    os.remove(os.path.join(path, 'config.json'))
    with self.assertRaisesRegex(ValueError, 'no EOS token found'):
      tokenizers.CheckpointTokenizer(path)

  def test_sentencepiece_model(self):
    import sentencepiece
    path = tempfile.mkdtemp()
    text = os.path.join(path, 'corpus.txt')
    with open(text, 'w') as f:
      f.write('\n'.join(['the cat sat on the mat', 'a dog and a cat',
                         'the mat is red'] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=text, model_prefix=os.path.join(path, 'tokenizer'),
        vocab_size=20, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
        minloglevel=2)
    t = tokenizers.CheckpointTokenizer(path)
    self.assertEqual((t.pad_id, t.bos_id, t.eos_id, t.vocab_size),
                     (0, 1, 2, 20))
    ids = t.encode('the cat sat')
    self.assertNotIn(3, ids)  # No unknown pieces.
    self.assertEqual(t.decode(ids + [t.eos_id] + ids), 'the cat sat')



class ResolveTest(absltest.TestCase):

  def test_default_is_the_anchors_tokenizer_or_bytes(self):
    self.assertEqual(tokenizers.resolve_spec('', ''), 'byte')
    self.assertEqual(tokenizers.resolve_spec('', '/ckpt/a'), '/ckpt/a')
    self.assertEqual(tokenizers.resolve_spec('anchor', '/ckpt/a'), '/ckpt/a')
    self.assertEqual(tokenizers.resolve_spec('char:1024', '/ckpt/a'),
                     'char:1024')
    self.assertEqual(tokenizers.get_tokenizer('').name, 'byte')
    with self.assertRaisesRegex(ValueError, r"data\.tokenizer='anchor'.*"
                                r'models\.anchor\.checkpoint is empty'):
      tokenizers.resolve_spec('anchor', '')

  def test_a_calm_jax_model_directory_reads_its_recorded_tokenizer(self):
    # A model pretrained here has model.json, not tokenizer.json: the default
    # `anchor` is the tokenizer that file records, not the directory.
    for spec, name in (('char:1024', 'char:1024'), ('byte', 'byte')):
      path = tempfile.mkdtemp()
      with open(os.path.join(path, 'model.json'), 'w') as f:
        json.dump({'format': 1, 'arch': {}, 'tokenizer': {
            'spec': spec, 'fingerprint': 'x', 'vocab_size': 1}}, f)
      self.assertEqual(tokenizers.resolve_spec('', path), spec)
      self.assertEqual(tokenizers.resolve_spec('anchor', path), spec)
      self.assertEqual(tokenizers.get_tokenizer('anchor', path).name, name)
    # A directory that has its own tokenizer files is itself the spec.
    bpe = fixtures.train_bpe(tempfile.mkdtemp())
    with open(os.path.join(bpe, 'model.json'), 'w') as f:
      json.dump({'tokenizer': {'spec': 'byte'}}, f)
    self.assertEqual(tokenizers.resolve_spec('', bpe), os.path.abspath(bpe))
    # Neither: named as before.
    with self.assertRaisesRegex(ValueError, 'neither tokenizer.json nor '
                                'tokenizer.model'):
      tokenizers.get_tokenizer('anchor', tempfile.mkdtemp())

  def test_a_directory_is_loaded_and_a_bad_one_named(self):
    path = fixtures.train_bpe(tempfile.mkdtemp())
    tok = tokenizers.get_tokenizer(path)
    self.assertIsInstance(tok, tokenizers.CheckpointTokenizer)
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))
    self.assertEqual(tok.decode(tok.encode('reverse: red cat =>')),
                     'reverse: red cat =>')
    self.assertIs(tokenizers.get_tokenizer(path), tok)  # Loaded once.
    empty = tempfile.mkdtemp()
    with self.assertRaisesRegex(ValueError, 'neither tokenizer.json nor '
                                'tokenizer.model'):
      tokenizers.get_tokenizer(empty)

  def test_fingerprints_compare_the_token_to_id_maps(self):
    a = tokenizers.get_tokenizer(fixtures.train_bpe(tempfile.mkdtemp()))
    copy = tokenizers.get_tokenizer(fixtures.train_bpe(tempfile.mkdtemp()))
    # Same size, other merges: the ids mean other things.
    other = tokenizers.get_tokenizer(fixtures.train_bpe(
        tempfile.mkdtemp(), seed_text='zebra quokka axolotl ' * 50))
    self.assertEqual(a.vocab_size, other.vocab_size)
    self.assertEqual(a.fingerprint, copy.fingerprint)
    self.assertNotEqual(a.fingerprint, other.fingerprint)
    self.assertEqual(tokenizers.difference(a, copy), '')
    self.assertRegex(tokenizers.difference(a, other),
                     r'320 and 320 tokens.*in only one of them')
    byte, char = (tokenizers.get_tokenizer(n) for n in ('byte', 'char'))
    self.assertNotEqual(byte.fingerprint, char.fingerprint)
    self.assertEqual(char.fingerprint,
                     tokenizers.get_tokenizer('char:768').fingerprint)
    self.assertEqual(tokenizers.record(byte)['spec'], 'byte')


if __name__ == '__main__':
  absltest.main()
