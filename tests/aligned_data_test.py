"""Tests for the aligned streams of calm_jax.data.pipeline (`aligned=`).

The anchor reads bytes; the augmenting model a byte-level BPE trained here
(tests/fixtures.py), so the two streams of one text differ in length and
in where their tokens end.
"""

import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from calm_jax.data import align
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from tests import fixtures

BYTE = tokenizers.get_tokenizer('byte')
NAME = 'bpe'
DOC = 'héllo wörld ' * 50  # Two-byte characters for the byte anchor.


def _key(field: str, name: str = NAME) -> str:
  return align.key(name, field)


def _examples(n: int, seed: int = 0) -> list[dict[str, str]]:
  return [{'prompt': r['prompt'], 'target': r['completion']}
          for r in fixtures.reverse_task(n, seed)]


def _text_of(ids) -> str:
  """The byte anchor's text of `ids` (BOS dropped); raises if the ids split
  a multi-byte character."""
  return bytes(int(i) - 3 for i in ids if i != BYTE.bos_id).decode('utf-8')


class _BpeTestCase(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._dir = tempfile.mkdtemp()
    cls.bpe = tokenizers.get_tokenizer(fixtures.train_bpe(cls._dir))
    cls.aligned = {NAME: cls.bpe}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._dir, ignore_errors=True)
    super().tearDownClass()

  def assert_row_reads_own_piece(self, row, name=NAME):
    """Every anchor position of segment k reads at least its piece's aug
    BOS and nothing past its piece's aug tokens; padding reads nothing."""
    seg, aug_seg = row['segment_ids'], row[_key('segment_ids', name)]
    counts = row[_key('counts', name)]
    for t in range(len(seg)):
      if seg[t] == 0:
        self.assertEqual(counts[t], 0)
        continue
      own = np.flatnonzero(aug_seg == seg[t])
      self.assertNotEmpty(own)
      self.assertGreaterEqual(counts[t] - 1, own[0])  # Its BOS at least.
      self.assertLessEqual(counts[t] - 1, own[-1])
      self.assertEqual(aug_seg[counts[t] - 1], seg[t])


class PaddedRowsTest(_BpeTestCase):

  def test_fields_shapes_and_counts(self):
    ex = {'prompt': 'reverse: red cat =>', 'target': ' cat red'}
    row = pipeline.encode_example(ex, BYTE, 48, aligned=self.aligned,
                                  aug_seq_len=20)
    plain = pipeline.encode_example(ex, BYTE, 48)
    self.assertEqual(set(row) - set(plain), {
        _key('inputs'), _key('counts'), _key('prompt_mask')})
    for k in plain:  # The anchor's fields are unchanged.
      np.testing.assert_array_equal(row[k], plain[k])
    self.assertEqual(row[_key('inputs')].shape, (20,))
    self.assertEqual(row[_key('prompt_mask')].shape, (20,))
    self.assertEqual(row[_key('counts')].shape, (48,))
    for f in ('inputs', 'counts', 'prompt_mask'):
      self.assertEqual(row[_key(f)].dtype, np.int32)
    a = align.align_example(ex['prompt'], ex['target'], BYTE, self.bpe)
    m, n = len(a.ids), len(a.counts)
    self.assertEqual(n, 1 + len(ex['prompt']) + len(ex['target']))
    self.assertLess(m, n)  # BPE: fewer tokens than bytes.
    np.testing.assert_array_equal(row[_key('inputs')][:m], a.ids)
    np.testing.assert_array_equal(
        a.ids, [self.bpe.bos_id] + self.bpe.encode(ex['prompt'])
        + self.bpe.encode(ex['target']))
    self.assertTrue((row[_key('inputs')][m:] == self.bpe.pad_id).all())
    np.testing.assert_array_equal(row[_key('counts')][:n], a.counts)
    self.assertTrue((row[_key('counts')][n:] == 0).all())
    self.assertGreaterEqual(row[_key('counts')][:n].min(), 1)
    np.testing.assert_array_equal(
        row[_key('prompt_mask')], np.arange(20) < a.prompt_count)
    self.assertEqual(a.prompt_count,
                     1 + len(self.bpe.encode(ex['prompt'])))

  def test_aug_seq_len_defaults_to_seq_len(self):
    ex = _examples(1)[0]
    row = pipeline.encode_example(ex, BYTE, 72, aligned=self.aligned)
    self.assertEqual(row[_key('inputs')].shape, (72,))

  def test_aug_seq_len_error(self):
    ex = {'prompt': 'reverse: red cat =>', 'target': ' cat red',
          'origin': 'mine.jsonl:3'}
    needed = len(align.align_example(ex['prompt'], ex['target'], BYTE,
                                     self.bpe).ids)
    msg = (rf'data\.aug_seq_len={needed - 1} is too short: an example needs '
           rf"{needed} positions of augmenting model 'bpe'.*at least "
           rf'{needed}\b.*reverse: red cat')
    with self.assertRaisesRegex(ValueError, msg):
      pipeline.encode_example(ex, BYTE, 48, aligned=self.aligned,
                              aug_seq_len=needed - 1)
    pipeline.encode_example(ex, BYTE, 48, aligned=self.aligned,
                            aug_seq_len=needed)
    # Packed rows refuse it too, and check_fits finds it before training.
    with self.assertRaisesRegex(ValueError, msg):
      pipeline.document_pieces(ex, BYTE, 48, aligned=self.aligned,
                               aug_seq_len=needed - 1)
    source = [{'prompt': 'red =>', 'target': ' red'}, ex]
    with self.assertRaisesRegex(ValueError, 'mine.jsonl:3: ' + msg):
      pipeline.check_fits(source, BYTE, 48, 'data.seq_len',
                          documents_fit=True, aligned=self.aligned,
                          aug_seq_len=needed - 1)
    pipeline.check_fits(source, BYTE, 48, 'data.seq_len', documents_fit=True,
                        aligned=self.aligned, aug_seq_len=needed)
    self.assertFalse(pipeline.fits(ex, BYTE, 48, aligned=self.aligned,
                                   aug_seq_len=needed - 1))
    self.assertTrue(pipeline.fits(ex, BYTE, 48, aligned=self.aligned,
                                  aug_seq_len=needed))
    # The anchor's own limit is still checked first, by its own field.
    with self.assertRaisesRegex(ValueError, r'data\.seq_len=10 is too short'):
      pipeline.check_fits([ex], BYTE, 10, 'data.seq_len',
                          aligned=self.aligned, aug_seq_len=needed)
    # aug_seq_len 0 is data.seq_len, and the message says so: one code
    # point per anchor position, one byte per BPE token.
    char = tokenizers.get_tokenizer('char')
    accents = {'prompt': 'ü=', 'target': 'ïöäë'}
    needed = len(align.align_example(accents['prompt'], accents['target'],
                                     char, self.bpe).ids)
    self.assertGreater(needed, 8)
    with self.assertRaisesRegex(ValueError, r'data\.aug_seq_len=0 \(0: '
                                rf'data\.seq_len, 8\) is too short.*needs '
                                rf'{needed} positions'):
      pipeline.encode_example(accents, char, 8, aligned=self.aligned)
    self.assertFalse(pipeline.fits(accents, char, 8, aligned=self.aligned))
    self.assertTrue(pipeline.fits(accents, char, 8))

  def test_same_tokenizer_is_the_anchor_stream(self):
    same = {'self': BYTE}
    ex = _examples(1)[0]
    row = pipeline.encode_example(ex, BYTE, 48, aligned=same)
    n = int(row['prompt_len']) + len(ex['target'])
    np.testing.assert_array_equal(row[_key('inputs', 'self')][:n],
                                  row['inputs'][:n])
    np.testing.assert_array_equal(row[_key('counts', 'self')][:n],
                                  np.arange(1, n + 1))
    # Packed: the streams coincide row for row, counts t + 1 in each piece.
    rows = pipeline._pack_block(_examples(10), BYTE, 128, aligned=same)
    self.assertLess(len(rows), 10)
    for r in rows:
      for f in ('inputs', 'segment_ids', 'positions', 'prompt_mask'):
        np.testing.assert_array_equal(r[_key(f, 'self')], r[f])
      counts = r[_key('counts', 'self')]
      np.testing.assert_array_equal(
          counts, np.where(r['segment_ids'] > 0, np.arange(1, 129), 0))
      self.assert_row_reads_own_piece(r, 'self')


class PackedRowsTest(_BpeTestCase):

  def test_pieces_reproduce_align_example(self):
    examples = _examples(16) + [{'prompt': '', 'target': 'red cat blue dog'}]
    by_text = {ex['prompt'] + ex['target']: ex for ex in examples}
    rows = pipeline._pack_block(examples, BYTE, 96, aligned=self.aligned,
                                aug_seq_len=48)
    self.assertGreater(max(r['segment_ids'].max() for r in rows), 2)
    seen = []
    for row in rows:
      self.assertEqual(row[_key('inputs')].shape, (48,))
      for f in ('segment_ids', 'positions', 'prompt_mask'):
        self.assertEqual(row[_key(f)].shape, (48,))
      self.assertEqual(row[_key('counts')].shape, (96,))
      seg, aug_seg = row['segment_ids'], row[_key('segment_ids')]
      self.assertEqual(seg.max(), aug_seg.max())
      for k in range(1, seg.max() + 1):
        cut, aug_cut = np.flatnonzero(seg == k), np.flatnonzero(aug_seg == k)
        # Each piece's stream is contiguous, in the anchor pieces' order.
        np.testing.assert_array_equal(
            aug_cut, np.arange(aug_cut[0], aug_cut[0] + len(aug_cut)))
        ex = by_text[_text_of(row['inputs'][cut])]
        seen.append(ex['prompt'] + ex['target'])
        a = align.align_example(ex['prompt'], ex['target'], BYTE, self.bpe)
        np.testing.assert_array_equal(row[_key('inputs')][aug_cut], a.ids)
        np.testing.assert_array_equal(row[_key('positions')][aug_cut],
                                      np.arange(len(a.ids)))
        np.testing.assert_array_equal(
            row[_key('counts')][cut] - aug_cut[0], a.counts)
        np.testing.assert_array_equal(
            row[_key('prompt_mask')][aug_cut],
            np.arange(len(a.ids)) < a.prompt_count)
      pad = aug_seg == 0
      self.assertTrue((row[_key('inputs')][pad] == self.bpe.pad_id).all())
      self.assertTrue((row[_key('prompt_mask')][pad] == 0).all())
      self.assert_row_reads_own_piece(row)
    self.assertCountEqual(seen, list(by_text))

  def test_first_fit_respects_both_lengths(self):
    # Short in bytes, long in BPE tokens: non-ASCII text the BPE never saw.
    long_aug = {'prompt': 'ü=', 'target': 'ïöäë' * 2}
    short = _examples(2)
    pieces = [p for ex in (short[0], long_aug, short[1])
              for p in pipeline.document_pieces(
                  ex, BYTE, 160, aligned=self.aligned, aug_seq_len=40)]
    sizes = [(len(p['inputs']), len(p[_key('inputs')])) for p in pieces]
    aug_len = sizes[0][1] + sizes[2][1]
    self.assertGreater(sizes[0][1] + sizes[1][1], aug_len)
    self.assertLessEqual(sum(n for n, _ in sizes), 160)  # Anchor: room.
    rows = pipeline.pack_pieces(pieces, 160, BYTE.pad_id,
                                aligned=self.aligned, aug_seq_len=aug_len)
    # The second piece does not fit the first row's stream; the third does.
    self.assertLen(rows, 2)
    self.assertEqual(rows[0]['segment_ids'].max(), 2)
    self.assertEqual(rows[1]['segment_ids'].max(), 1)
    self.assertEqual((rows[0][_key('segment_ids')] > 0).sum(), aug_len)
    # Without the streams all three share one row.
    self.assertLen(pipeline.pack_pieces(pieces, 160, BYTE.pad_id), 1)


class DocumentTest(_BpeTestCase):

  def _check_pieces(self, pieces, seq_len, aug_len, text):
    self.assertGreater(len(pieces), 1)
    for i, p in enumerate(pieces):
      n, m = len(p['inputs']), len(p[_key('inputs')])
      self.assertLessEqual(n, seq_len)
      self.assertLessEqual(m, aug_len)
      self.assertEqual(p[_key('inputs')][0], self.bpe.bos_id)
      self.assertEqual(p['inputs'][0] == BYTE.bos_id, i == 0)
      self.assertEqual(p['prompt_mask'].tolist(), [i == 0] + [0] * (n - 1))
      self.assertTrue((p['weights'] == 1).all())
      piece_text = _text_of(p['inputs'])  # Whole characters only.
      a = align.align_example('', piece_text, BYTE, self.bpe)
      np.testing.assert_array_equal(p[_key('inputs')], a.ids)
      np.testing.assert_array_equal(p[_key('counts')],
                                    a.counts if i == 0 else a.counts[1:])
      self.assertGreaterEqual(p[_key('counts')].min(), 1)
      self.assertEqual(p[_key('prompt_mask')].tolist(),
                       [1] + [0] * (m - 1))
    self.assertEqual(''.join(_text_of(p['inputs']) for p in pieces), text)
    # A subword stream: no word is split (each piece ends after a space).
    for p in pieces[:-1]:
      self.assertEqual(_text_of(p['inputs'])[-1], ' ')
    inputs = np.concatenate([p['inputs'] for p in pieces])
    targets = np.concatenate([p['targets'] for p in pieces])
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    self.assertEqual(targets[-1], BYTE.eos_id)

  def test_long_document_fits_both_lengths(self):
    doc = {'prompt': '', 'target': DOC}
    for seq_len, aug_seq_len in ((64, 24), (32, 96), (33, 0)):
      with self.subTest(seq_len=seq_len, aug_seq_len=aug_seq_len):
        pieces = pipeline.document_pieces(doc, BYTE, seq_len,
                                          aligned=self.aligned,
                                          aug_seq_len=aug_seq_len)
        self._check_pieces(pieces, seq_len, aug_seq_len or seq_len, DOC)
        # The tighter stream fills its rows (up to a character's tokens).
        fill = max(sum(len(p['inputs']) for p in pieces) / seq_len,
                   sum(len(p[_key('inputs')]) for p in pieces)
                   / (aug_seq_len or seq_len))
        self.assertLessEqual(len(pieces), fill * 1.2 + 1)

  def test_short_document_is_one_piece(self):
    doc = {'prompt': '', 'target': 'héllo wörld'}
    (p,) = pipeline.document_pieces(doc, BYTE, 64, aligned=self.aligned)
    (plain,) = pipeline.document_pieces(doc, BYTE, 64)
    for k in plain:
      np.testing.assert_array_equal(p[k], plain[k])
    a = align.align_example('', doc['target'], BYTE, self.bpe)
    np.testing.assert_array_equal(p[_key('inputs')], a.ids)
    np.testing.assert_array_equal(p[_key('counts')], a.counts)

  def test_packed_documents(self):
    examples = [{'prompt': '', 'target': DOC[:150]}] + _examples(6) + [
        {'prompt': '', 'target': DOC}]
    rows = pipeline._pack_block(examples, BYTE, 64, aligned=self.aligned,
                                aug_seq_len=40)
    for row in rows:
      self.assertEqual(row['inputs'].shape, (64,))
      self.assertEqual(row[_key('inputs')].shape, (40,))
      self.assert_row_reads_own_piece(row)
    text = ''.join(
        _text_of(row['inputs'][row['segment_ids'] == k])
        for row in rows for k in range(1, row['segment_ids'].max() + 1))
    for ex in examples:
      self.assertIn(ex['prompt'] + ex['target'][:40], text)

  def test_a_character_that_never_fits(self):
    with self.assertRaisesRegex(ValueError, 'cannot be cut into rows'):
      pipeline.document_pieces({'prompt': '', 'target': DOC}, BYTE, 16,
                               aligned=self.aligned, aug_seq_len=1)


class DatasetTest(_BpeTestCase):

  def test_train_dataset(self):
    source = _examples(40) + [{'prompt': '', 'target': DOC}]
    for pack in (False, True):
      with self.subTest(pack=pack):
        src = source if pack else source[:-1]
        ds = pipeline.train_dataset(
            src, tokenizer=BYTE, seq_len=64, batch_size=4, seed=0,
            pack=pack, num_threads=1, prefetch_buffer_size=4,
            aligned=self.aligned, aug_seq_len=48)
        it = iter(ds)
        for _ in range(3):
          batch = next(it)
          fields = align.FIELDS if pack else ('inputs', 'counts',
                                              'prompt_mask')
          self.assertEqual({k for k in batch if k.startswith(align.PREFIX)},
                           {_key(f) for f in fields})
          for f in fields:
            self.assertEqual(batch[_key(f)].shape,
                             (4, 64) if f == 'counts' else (4, 48))
          self.assertEqual(batch['inputs'].shape, (4, 64))
          inputs = align.model_inputs(batch)
          self.assertEqual(set(inputs[NAME]),
                           {'tokens' if f == 'inputs' else f for f in fields})
          if pack:
            for row in range(4):
              self.assert_row_reads_own_piece(
                  {k: v[row] for k, v in batch.items()})
    # Without `aligned` nothing changes.
    batch = next(iter(pipeline.train_dataset(
        source[:-1], tokenizer=BYTE, seq_len=64, batch_size=4, seed=0,
        num_threads=1, prefetch_buffer_size=4)))
    self.assertFalse(any(k.startswith(align.PREFIX) for k in batch))

  def test_eval_batches(self):
    source = _examples(5) + [{'prompt': '', 'target': DOC[:100]}]
    batches = pipeline.eval_batches(source, tokenizer=BYTE, seq_len=64,
                                    batch_size=4, aligned=self.aligned,
                                    aug_seq_len=32)
    # The document (100 characters, 112 bytes) fills several rows: the
    # stream's 32 positions bind before the anchor's 64.
    valid = np.concatenate([b['valid'] for b in batches])
    self.assertGreater(valid.sum(), 5 + 2)
    for b in batches:
      self.assertEqual(b['inputs'].shape, (4, 64))
      self.assertEqual(b[_key('inputs')].shape, (4, 32))
      self.assertEqual(b[_key('prompt_mask')].shape, (4, 32))
      self.assertEqual(b[_key('counts')].shape, (4, 64))
      self.assertTrue((b[_key('counts')][b['valid'], 0] == 1).all())
    for i, ex in enumerate(source[:5]):
      row = pipeline.encode_example(ex, BYTE, 64, aligned=self.aligned,
                                    aug_seq_len=32)
      for k in (_key('inputs'), _key('counts'), _key('prompt_mask')):
        np.testing.assert_array_equal(batches[i // 4][k][i % 4], row[k])
    # The filler rows: the stream's BOS, read by the anchor's BOS only.
    last = batches[-1]
    filler = ~last['valid']
    self.assertTrue(filler.any())
    for f, first in (('inputs', self.bpe.bos_id), ('counts', 1),
                     ('prompt_mask', 1)):
      col = last[_key(f)][filler]
      self.assertTrue((col[:, 0] == first).all())
      rest = self.bpe.pad_id if f == 'inputs' else 0
      self.assertTrue((col[:, 1:] == rest).all())


if __name__ == '__main__':
  absltest.main()
