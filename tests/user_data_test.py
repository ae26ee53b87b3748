"""Your own data: JSONL, text files and TFDS datasets by name, converted once,
packed into rows that keep documents apart."""

import json
import os
import sys

from absl import flags
from absl.testing import absltest
import ml_collections
import numpy as np

from calm_jax import config_lib
from calm_jax import data as data_lib
from calm_jax.data import files
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from tests import fixtures


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _data_cfg(**kw) -> ml_collections.ConfigDict:
  return config_lib.data_config(kw.pop('dataset', 'jsonl'),
                                **dict(dict(tokenizer='byte', seq_len=48), **kw))


def _segments(batch, row):
  """{segment id: (inputs, targets, weights, positions)} of one row."""
  seg = batch['segment_ids'][row]
  return {int(s): tuple(batch[k][row][seg == s] for k in (
      'inputs', 'targets', 'weights', 'positions'))
          for s in np.unique(seg) if s}


class FilesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    self.train = fixtures.write_jsonl(
        os.path.join(self.dir, 'train.jsonl'),
        [{'prompt': 'q1', 'completion': ' a1'}, {'text': 'a document'},
         {'prompt': 'q2', 'completion': ' a2', 'extra': 3}])

  def test_jsonl_both_styles_with_origins(self):
    cfg = _data_cfg(train=self.train, eval=self.train)
    source = files.source('train', cfg, os.path.join(self.dir, 'tfds'))
    got = [{k: v.decode() for k, v in source[i].items()}
           for i in range(len(source))]
    self.assertEqual([(g['prompt'], g['target']) for g in got],
                     [('q1', ' a1'), ('', 'a document'), ('q2', ' a2')])
    self.assertEqual(got[2]['origin'], f'{self.train}:3')

  def test_converted_once_and_again_when_a_file_changes(self):
    data_dir = os.path.join(self.dir, 'tfds')
    cfg = _data_cfg(train=self.train, eval=self.train)
    files.source('train', cfg, data_dir)
    built = os.listdir(os.path.join(data_dir, 'user_files'))
    self.assertLen(built, 1)
    mtime = os.path.getmtime(os.path.join(data_dir, 'user_files', built[0]))
    files.source('train', cfg, data_dir)  # Reused, not rebuilt.
    self.assertEqual(os.listdir(os.path.join(data_dir, 'user_files')), built)
    self.assertEqual(mtime, os.path.getmtime(
        os.path.join(data_dir, 'user_files', built[0])))
    with open(self.train, 'a') as f:
      f.write(json.dumps({'text': 'one more'}) + '\n')
    self.assertLen(files.source('train', cfg, data_dir), 4)
    self.assertLen(os.listdir(os.path.join(data_dir, 'user_files')), 2)

  def test_eval_from_a_seeded_fraction(self):
    path = fixtures.write_jsonl(os.path.join(self.dir, 'many.jsonl'),
                                [{'text': f'doc {i}'} for i in range(40)])
    cfg = _data_cfg(train=path, eval_fraction=0.25, split_seed=3)
    data_dir = os.path.join(self.dir, 'tfds')
    texts = lambda split: [files.source(split, cfg, data_dir)[i]['target']
                           for i in range(len(files.source(split, cfg,
                                                           data_dir)))]
    train, evals = texts('train'), texts('eval')
    self.assertLen(evals, 10)
    self.assertEmpty(set(train) & set(evals))
    self.assertLen(set(train) | set(evals), 40)
    cfg.split_seed = 4
    self.assertNotEqual(texts('eval'), evals)

  def test_text_files_are_documents(self):
    for name, text in (('a.txt', 'first file\n'), ('b.txt', 'second\n')):
      with open(os.path.join(self.dir, name), 'w') as f:
        f.write(text)
    cfg = _data_cfg(dataset='text', train=os.path.join(self.dir, '*.txt'),
                    eval=os.path.join(self.dir, 'b.txt'))
    source = files.source('train', cfg, os.path.join(self.dir, 'tfds'))
    self.assertEqual([source[i]['target'].decode() for i in range(2)],
                     ['first file\n', 'second\n'])
    self.assertTrue(files.documents_only(cfg))

  def test_bad_input_names_the_file_line_and_fix(self):
    data_dir = os.path.join(self.dir, 'tfds')
    cases = [
        ('{"prompt": "x"', r'bad\.jsonl:1 is not a JSON object'),
        ('{"question": "x", "answer": "y"}',
         r"bad\.jsonl:1 has neither 'text' nor 'prompt' and 'completion' "
         r"\(its fields: \['answer', 'question'\]\); set data\.text_key"),
        ('{"text": 3}', r"field 'text' is of type int, not a string"),
        ('[1, 2]', r'bad\.jsonl:1 is a JSON value of type list, not an object'),
        ('', r'bad\.jsonl holds no examples; give files with at least one'),
    ]
    for line, pattern in cases:
      with self.subTest(line):
        bad = os.path.join(self.dir, 'bad.jsonl')
        with open(bad, 'w') as f:
          f.write(line + '\n')
        with self.assertRaisesRegex(ValueError, 'data.train: .*' + pattern):
          files.source('train', _data_cfg(train=bad, eval=self.train),
                       data_dir)
    with self.assertRaisesRegex(ValueError, r"data\.train=.*nothing\*\.jsonl'"
                                ' matches no file'):
      files.check_data_config(_data_cfg(train=os.path.join(
          self.dir, 'nothing*.jsonl')))
    with self.assertRaisesRegex(ValueError, r'data\.eval_fraction=1\.5'):
      files.check_data_config(_data_cfg(train=self.train, eval_fraction=1.5))
    with self.assertRaisesRegex(ValueError, r"data\.train=.* is read only by "
                                r"data\.dataset in \['jsonl', 'text', 'tfds'\]"):
      data_lib.validate_config(_data_cfg(dataset='kv_arithmetic',
                                         train=self.train))


class PackingTest(absltest.TestCase):

  def _batches(self, source, tok, n=3, seq_len=32, batch=4, seed=0):
    it = iter(pipeline.train_dataset(source, tokenizer=tok, seq_len=seq_len,
                                     batch_size=batch, seed=seed, pack=True,
                                     num_threads=0))
    return it, [next(it) for _ in range(n)]

  def test_rows_hold_whole_examples_tokenized_by_the_tokenizer(self):
    tok = tokenizers.get_tokenizer(fixtures.train_bpe(
        self.create_tempdir().full_path))
    examples = [{'prompt': r['prompt'], 'target': r['completion']}
                for r in fixtures.reverse_task(30)]
    _, batches = self._batches(examples, tok)
    by_prompt = {tuple([tok.bos_id] + tok.encode(e['prompt'])): e
                 for e in examples}
    seen = 0
    for b in batches:
      self.assertEqual(b['inputs'].shape, (4, 32))
      for row in range(4):
        segs = _segments(b, row)
        for inputs, targets, weights, positions in segs.values():
          np.testing.assert_array_equal(positions, np.arange(len(inputs)))
          ids = list(inputs) + [int(targets[-1])]
          # The row holds exactly the tokenizer's ids of one example ...
          example = next(e for p, e in by_prompt.items()
                         if tuple(ids[:len(p)]) == p)
          self.assertEqual(ids, [tok.bos_id] + tok.encode(
              example['prompt']) + tok.encode(example['target']) +
                           [tok.eos_id])
          # ... weighted on the completion and EOS only.
          n_prompt = len(tok.encode(example['prompt']))
          np.testing.assert_array_equal(
              weights, [0.0] * n_prompt + [1.0] * (len(weights) - n_prompt))
          seen += 1
      # Padding is segment 0 with zero weight.
      self.assertTrue(np.all(b['weights'][b['segment_ids'] == 0] == 0))
    self.assertGreater(seen, 1.5 * 4 * len(batches))  # Packed.

  def test_long_documents_are_cut_into_rows(self):
    tok = tokenizers.get_tokenizer('byte')
    doc = 'x' * 70
    _, batches = self._batches([{'prompt': '', 'target': doc}], tok, n=1,
                               seq_len=32, batch=3)
    pieces = [_segments(batches[0], r)[1] for r in range(3)]
    self.assertEqual(sorted(len(p[0]) for p in pieces), [7, 32, 32])
    whole = np.concatenate([p[0] for p in sorted(pieces, key=lambda p: -len(
        p[0]))])
    self.assertEqual(list(whole), [tok.bos_id] + tok.encode(doc))
    self.assertTrue(all(np.all(p[2] == 1.0) for p in pieces))
    # Eval rows cut it the same way, unpacked.
    rows = pipeline.eval_batches([{'prompt': '', 'target': doc}],
                                 tokenizer=tok, seq_len=32, batch_size=4)[0]
    self.assertEqual(list(rows['valid']), [True, True, True, False])
    self.assertEqual(rows['weights'].sum(), 71)  # 70 bytes and EOS.

  def test_the_iterator_resumes_where_it_stopped(self):
    tok = tokenizers.get_tokenizer('byte')
    examples = [{'prompt': f'p{i}', 'target': 'y' * (i % 7)}
                for i in range(50)]
    it, _ = self._batches(examples, tok, n=2, seed=5)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again, _ = self._batches(examples, tok, n=0, seed=5)
    again.set_state(state)
    for want in expected:
      got = next(again)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])

  def test_a_too_long_completion_is_refused_before_training(self):
    workdir = self.create_tempdir().full_path
    path = fixtures.write_jsonl(os.path.join(workdir, 't.jsonl'), [
        {'prompt': 'short', 'completion': 'ok'},
        {'prompt': 'long', 'completion': 'z' * 100},
        {'text': 'a document may be long ' * 10}])
    data = data_lib.Data(_data_cfg(train=path, eval=path, pack=True),
                         workdir)
    with self.assertRaisesRegex(
        ValueError, rf'{path}:2: data\.seq_len=48 is too short: an example '
        r'needs 105 positions.*Raise data\.seq_len to at least 105'):
      data.train('train')
    with self.assertRaisesRegex(
        ValueError, r"eval\.metrics\.eval='exact_match' scores completions "
        rf"of prompts, but split 'eval' holds documents .*{path}:3.*set "
        r"eval\.metrics\.eval='loss'"):
      data.eval('eval', 4, metric='exact_match')


class TfdsByNameTest(absltest.TestCase):

  def test_a_registered_array_record_dataset(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.dirname(__file__))
    try:
      import tiny_tfds  # pylint: disable=g-import-not-at-top
    finally:
      sys.path.pop(0)
    data_dir = self.create_tempdir().full_path
    tiny_tfds.TinyQa(data_dir=data_dir, file_format='array_record'
                     ).download_and_prepare(file_format='array_record')
    cfg = _data_cfg(dataset='tfds', tfds_name='tiny_qa', tfds_data_dir=data_dir,
                    train='train', prompt_key='question',
                    completion_key='answer')
    data_lib.validate_config(cfg)
    self.assertFalse(files.documents_only(cfg))  # Prompt/completion pairs.
    train = files.source('train', cfg, '')
    evals = files.source('eval', cfg, '')
    self.assertEqual((len(train), len(evals)), (19, 1))  # 95% / 5% of 20.
    self.assertEqual(train[3], {'prompt': 'q3', 'target': ' a3',
                                'origin': 'tiny_qa/train[:95%][3]'})
    cfg.eval = 'test'
    cfg.train = 'train'
    self.assertLen(files.source('train', cfg, ''), 20)
    self.assertLen(files.source('eval', cfg, ''), 4)
    cfg.prompt_key = 'nope'
    self.assertTrue(files.documents_only(cfg))
    cfg.text_key = 'nope'
    with self.assertRaisesRegex(ValueError, r"has neither 'nope' nor 'nope' "
                                r"and 'answer' \(its fields: \['answer', "
                                r"'question'\]\)"):
      files.source('train', cfg, '')
    cfg.tfds_name = 'not_a_dataset'
    with self.assertRaisesRegex(ValueError, r"data\.tfds_name='not_a_dataset'"
                                ' is not a registered TFDS dataset'):
      files.source('train', cfg, '')
    del tfds


if __name__ == '__main__':
  absltest.main()
