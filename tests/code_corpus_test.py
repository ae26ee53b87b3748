"""Tests for calm_jax.data.code_corpus: files, chunks, pairs, prose, TFDS."""

import ast
import os
import textwrap

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import ml_collections

from calm_jax.data import code_corpus as cc

FORTUNES = cc.DEFAULT_PROSE_DIR

ALPHA = '''\
"""Module alpha."""

import functools

SCALE = 10


def add(a, b):
    """Adds two numbers.

    >>> add(1, 2)
    3
    """
    return a + b


@functools.lru_cache(maxsize=None)
def scaled(x):
    """Returns x times SCALE."""
    # A comment in the body.
    y = x * SCALE
    return y


def undocumented(x):
    return x


class Box:
    """A box."""

    def __init__(self, value):
        self.value = value

    def get(self, default=None):
        """Returns the value.

        >>> Box(3).get()
        3
        """
        if self.value is None:
            return default
        return self.value

    def only_doc(self):
        """Has nothing but a docstring."""
'''

FILES = {
    'alpha.py': ALPHA,
    'dup.py': ALPHA,  # Same content: dropped in favour of alpha.py.
    'empty.py': '\n\n',  # Blank: dropped.
    'beta.py': textwrap.dedent('''\
        def twice(s):
            """Returns s twice, e.g. 'abab' for 'ab'."""
            return s + s


        def unicode_name():
            """Returns a name with a non-ASCII letter: \u00e9t\u00e9."""
            return "\u00e9t\u00e9"
        '''),
    'gamma.py': textwrap.dedent('''\
        def neg(x):
            """Negates x.

            >>> neg(2)
            -2
            """
            return -x
        '''),
    'delta.py': textwrap.dedent('''\
        def square(x):
            """Squares x."""
            return x * x
        '''),
    'epsilon.py': 'DATA = [' + ', '.join(str(i) for i in range(300)) + ']\n',
    'zeta.py': textwrap.dedent('''\
        def big(n):
            """Returns a long list."""
            return [%s]
        ''') % ', '.join(str(i) for i in range(200)),
    'pkg/__init__.py': '"""A package."""\n',
    'pkg/mod.py': textwrap.dedent('''\
        def half(x):
            """Halves x.

            >>> half(4)
            2.0
            """
            return x / 2
        '''),
    'nopkg/tool.py': textwrap.dedent('''\
        def tool(x):
            """A tool.

            >>> tool(1)
            1
            """
            return x
        '''),
    # Excluded directories.
    'test/test_alpha.py': 'def test_add():\n    """T."""\n    assert True\n',
    'tests/helper.py': 'X = 1\n',
    'pkg/tests/helper.py': 'Y = 1\n',
    '__pycache__/stale.py': 'Z = 1\n',
    'site-packages/thirdparty.py': 'W = 1\n',
    'pydoc_data/topics.py': 'topics = {}\n',
}

KEPT = ('alpha.py', 'beta.py', 'delta.py', 'epsilon.py', 'gamma.py',
        'nopkg/tool.py', 'pkg/__init__.py', 'pkg/mod.py', 'zeta.py')

PROSE = {
    'quotes.txt': ('The quick brown fox jumps over the lazy dog.\n%\n'
                   'It is a truth universally acknowledged, that a single man '
                   'in possession of a good fortune, must be in want of a '
                   'wife.\n\t\t-- Jane Austen\n%\n'
                   '/\\_/\\  (o.o)  > ^ <  ###  ***\n%\n'  # ASCII art.
                   'Caf\u00e9 is not ASCII, so this record is dropped.\n%\n'
                   'You will be the one to find it in the end.\n'),
    'wisdom': ('A plain fortune file without an extension, and it is kept.\n'
               '%\nAll that glitters is not gold.\n%\n'),
    'wisdom.dat': 'binary index that is not prose at all, it is skipped\n',
    'more.txt': '\n'.join(
        f'Record {i} is a sentence of the prose corpus and it is long '
        'enough.\n%' for i in range(40)),
}
# Files in name order (more.txt, quotes.txt, wisdom), records in file order.
EXPECTED_PROSE = [
    f'Record {i} is a sentence of the prose corpus and it is long enough.'
    for i in range(40)
] + [
    'The quick brown fox jumps over the lazy dog.',
    'It is a truth universally acknowledged, that a single man in possession '
    'of a good fortune, must be in want of a wife.\n\t\t-- Jane Austen',
    'You will be the one to find it in the end.',
    'A plain fortune file without an extension, and it is kept.',
    'All that glitters is not gold.',
]


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _write_tree(root: str, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)


class CorpusTestCase(parameterized.TestCase):
  """Writes the small stdlib and prose trees; `config(**fields)`."""

  def setUp(self):
    super().setUp()
    self.stdlib_dir = self.create_tempdir('stdlib').full_path
    self.prose_dir = self.create_tempdir('prose').full_path
    _write_tree(self.stdlib_dir, FILES)
    _write_tree(self.prose_dir, PROSE)
    # Symlinks are skipped (the fortunes package links *.u8 to the files).
    os.symlink(os.path.join(self.prose_dir, 'wisdom'),
               os.path.join(self.prose_dir, 'wisdom.u8'))
    os.symlink(os.path.join(self.prose_dir, 'wisdom'),
               os.path.join(self.prose_dir, 'linked'))

  def config(self, **fields) -> cc.CodeCorpusConfig:
    defaults = dict(stdlib_dir=self.stdlib_dir, prose_dir=self.prose_dir,
                    max_chars=160, eval_file_fraction=0.3,
                    compose_file_fraction=0.3, seed=1)
    return cc.make_config(**(defaults | fields))


class FilesTest(CorpusTestCase):

  def test_listing_excludes_and_dedups(self):
    files = cc.load_files(self.config())
    self.assertEqual([f.path for f in files], list(KEPT))
    by_path = {f.path: f for f in files}
    self.assertEqual(by_path['alpha.py'].text, ALPHA)
    self.assertEqual(by_path['alpha.py'].module, 'alpha')
    self.assertEqual(by_path['pkg/__init__.py'].module, 'pkg')
    self.assertEqual(by_path['pkg/mod.py'].module, 'pkg.mod')
    self.assertEqual(by_path['nopkg/tool.py'].module, '')

  def test_split_by_file(self):
    config = self.config()
    split = cc.split_files(config)

    def paths(files):
      return [f.path for f in files]

    train, compose, held = map(paths, (split.train, split.compose, split.eval))
    self.assertEmpty(set(train) & set(held))
    self.assertContainsSubset(compose, train)
    self.assertCountEqual(train + held, KEPT)
    self.assertLen(held, round(0.3 * len(KEPT)))
    self.assertLen(compose, round(0.3 * len(KEPT)))
    for names in (train, compose, held):
      self.assertEqual(names, sorted(names))
    # Deterministic in the seed; another seed gives another split.
    self.assertEqual(cc.split_files(config), split)
    others = [paths(cc.split_files(self.config(seed=s)).eval)
              for s in range(1, 6)]
    self.assertTrue(any(o != held for o in others))

  def test_max_files_subset_before_split(self):
    files = cc.load_files(self.config(max_files=5))
    again = cc.load_files(self.config(max_files=5))
    self.assertLen(files, 5)
    self.assertEqual(files, again)
    self.assertContainsSubset([f.path for f in files], KEPT)
    split = cc.split_files(self.config(max_files=5))
    self.assertCountEqual(split.train + split.eval, files)

  def test_too_few_files(self):
    with self.assertRaisesRegex(ValueError, r'data\.code\.max_files=1'):
      cc.split_files(self.config(max_files=1))


class ChunkTest(absltest.TestCase):

  def test_chunks_reassemble_and_fit(self):
    text = ('short line\n' * 7 + 'x' * 95 + '\n' + '\u00e9' * 70 + '\n\n' +
            'tail without newline')
    for max_bytes in (16, 33, 64, 1000):
      chunks = cc.chunk_text(text, max_bytes)
      self.assertEqual(''.join(chunks), text)
      for chunk in chunks:
        self.assertNotEmpty(chunk)
        self.assertLessEqual(len(chunk.encode('utf-8')), max_bytes)
    # Lines are kept whole when they fit.
    self.assertEqual(cc.chunk_text('ab\ncd\n', 4), ['ab\n', 'cd\n'])
    self.assertEqual(cc.chunk_text('ab\ncd\n', 6), ['ab\ncd\n'])

  def test_pack_records(self):
    records = ['a' * 10, 'b' * 10, 'c' * 30, 'd' * 5]
    self.assertEqual(cc.pack_records(records, 22),
                     ['a' * 10 + '\n\n' + 'b' * 10, 'c' * 22, 'c' * 8,
                      'd' * 5])


class PairsTest(CorpusTestCase):

  def test_doc2code_reassembles_source(self):
    pairs = cc.extract_functions(ALPHA)
    self.assertEqual([p.name for p in pairs], ['add', 'scaled', 'Box.get'])
    tree = ast.parse(ALPHA)
    nodes = {n.name: n for n in ast.walk(tree)
             if isinstance(n, ast.FunctionDef)}
    for pair in pairs:
      node = nodes[pair.name.split('.')[-1]]
      expected = textwrap.dedent(
          ast.get_source_segment(ALPHA, node, padded=True))
      self.assertEqual(pair.source, expected)
      example = cc.doc2code_example(pair, 'alpha')
      self.assertEqual(example['prompt'] + example['target'], expected)
      self.assertTrue(example['prompt'].startswith('def '))  # No decorator.
      docstring = ast.get_docstring(node)
      self.assertEqual(pair.docstring, docstring)
      # The prompt ends with the docstring statement, as in the source.
      self.assertTrue(example['prompt'].rstrip().endswith('"""'))
      self.assertIn(docstring.splitlines()[0], example['prompt'])
      compile(pair.source, pair.name, 'exec')  # Methods are dedented.
    scaled = cc.doc2code_example(pairs[1], 'alpha')
    self.assertEqual(scaled['target'], '    # A comment in the body.\n'
                     '    y = x * SCALE\n    return y')

  def test_code2doc(self):
    for pair in cc.extract_functions(ALPHA):
      example = cc.code2doc_example(pair, 'alpha')
      self.assertEqual(example['task'], 'code2doc')
      self.assertTrue(example['prompt'].endswith('\n# Docstring:\n'))
      code = example['prompt'][:-len('\n# Docstring:\n')]
      self.assertNotIn('"""', code)
      self.assertEqual(example['target'], pair.docstring)
      # The rest of the function is intact and still parses.
      self.assertIn(pair.body, code)
      compile(code, pair.name, 'exec')

  def test_doctests_recorded(self):
    files = cc.load_files(self.config())
    doc2code, code2doc = cc.function_pairs(files, 480)
    by_name = {ex['name']: ex for ex in doc2code}
    self.assertCountEqual(
        by_name, ['add', 'scaled', 'Box.get', 'twice', 'unicode_name', 'neg',
                  'square', 'half', 'tool'])  # 'big' is too long.
    self.assertCountEqual([ex['name'] for ex in code2doc], by_name)
    self.assertEqual(by_name['add']['tests'],
                     'Adds two numbers.\n\n>>> add(1, 2)\n3')
    expected_modules = {'add': 'alpha', 'neg': 'gamma', 'half': 'pkg.mod',
                        'tool': ''}
    for name, ex in by_name.items():
      compile(ex['prompt'] + ex['target'], name, 'exec')
      if name in expected_modules:
        self.assertIn('>>> ', ex['tests'], name)
        self.assertEqual(ex['module'], expected_modules[name], name)
      else:  # No doctest, or a method (Box.get has one).
        self.assertEqual(ex['tests'], '', name)
    for ex in code2doc:
      self.assertEqual(ex['tests'], '')

  def test_long_pairs_dropped_not_truncated(self):
    config = self.config(max_chars=120)
    doc2code, code2doc = cc.function_pairs(cc.load_files(config), 120)
    for ex in doc2code + code2doc:
      self.assertTrue(cc.fits(ex, 120))
    names = {ex['name'] for ex in doc2code}
    self.assertNotIn('big', names)  # 700+ bytes: dropped.
    self.assertIn('square', names)
    for ex in doc2code:
      compile(ex['prompt'] + ex['target'], ex['name'], 'exec')


class SplitsTest(CorpusTestCase):

  def test_every_split(self):
    config = self.config()
    out = cc.generate_all(config)
    self.assertEqual(set(out), set(cc.SPLITS))
    tasks = {'code_train': {'code'}, 'code_eval': {'code'},
             'prose_train': {'prose'}, 'prose_eval': {'prose'},
             'pairs_compose': {'doc2code', 'code2doc'},
             'doc2code_eval': {'doc2code'}, 'code2doc_eval': {'code2doc'},
             'doctest_eval': {'doc2code'},
             'pairs_dev': {'doc2code', 'code2doc'}}
    # The fixture's modules are not importable in the sandbox, so no
    # doctest passes there: doctest_eval is empty (see DoctestEvalTest).
    self.assertEmpty(out['doctest_eval'])
    for split, examples in out.items():
      if split == 'doctest_eval':
        continue
      self.assertNotEmpty(examples, split)
      self.assertEqual({ex['task'] for ex in examples}, tasks[split], split)
      for ex in examples:
        self.assertEqual(set(ex), {'prompt', 'target', 'task', 'tests',
                                   'module', 'name'})
        self.assertTrue(cc.fits(ex, config.max_chars), (split, ex))
        if ex['task'] in ('code', 'prose'):
          self.assertEqual(ex['prompt'], '')
    self.assertEqual(cc.generate_all(config), out)  # Deterministic.

  def test_splits_follow_files(self):
    config = self.config()
    split = cc.split_files(config)
    out = cc.generate_all(config)
    train_text = ''.join(f.text for f in split.train)
    eval_text = ''.join(f.text for f in split.eval)
    code_train = [ex['target'] for ex in out['code_train']]
    self.assertEqual(''.join(code_train).replace('\n', ''),
                     train_text.replace('\n', ''))
    for ex in out['code_eval']:
      self.assertIn(ex['target'], eval_text)
    compose_names = {p.name for f in split.compose
                     for p in cc.extract_functions(f.text)}
    eval_names = {p.name for f in split.eval
                  for p in cc.extract_functions(f.text)}
    self.assertContainsSubset({ex['name'] for ex in out['pairs_compose']},
                              compose_names)
    for split_name in ('doc2code_eval', 'code2doc_eval'):
      self.assertContainsSubset({ex['name'] for ex in out[split_name]},
                                eval_names)
    compose_paths = {f.path for f in split.compose}
    dev_sources = {p.source for f in split.train if f.path not in compose_paths
                   for p in cc.extract_functions(f.text)}
    for ex in out['pairs_dev']:  # Non-compose training files only.
      source = (ex['prompt'] + ex['target'] if ex['task'] == 'doc2code' else
                ex['prompt'].split(cc.CODE2DOC_SEPARATOR)[0])
      self.assertTrue(any(source.split('\n')[0] in s for s in dev_sources),
                      ex)
    self.assertEmpty({ex['prompt'] for ex in out['pairs_dev']}
                     & {ex['prompt'] for ex in out['pairs_compose']})

  def test_eval_caps(self):
    out = cc.generate_all(self.config(num_code_eval=2, num_pairs_eval=1,
                                      max_chars=32))
    self.assertLen(out['code_eval'], 2)
    self.assertLessEqual(len(out['doc2code_eval']), 1)
    self.assertLessEqual(len(out['code2doc_eval']), 1)

  def test_prose(self):
    config = self.config(max_chars=480)
    records = cc.load_prose(config)
    # No ASCII art, no non-ASCII record, no *.dat file, no symlinks.
    self.assertEqual(records, EXPECTED_PROSE)
    train, held = cc.split_prose(config)
    self.assertCountEqual(train + held, records)
    self.assertLen(held, round(0.05 * len(records)))
    out = cc.generate_all(config)
    packed = '\n\n'.join(ex['target'] for ex in out['prose_train'])
    self.assertEqual(packed, '\n\n'.join(train))
    self.assertLess(len(out['prose_train']), len(train))  # Packed.

  def test_max_prose_records_subset_before_split(self):
    records = cc.load_prose(self.config())
    config = self.config(max_prose_records=len(records) - 1)
    train, held = cc.split_prose(config)
    self.assertLen(train + held, len(records) - 1)
    self.assertContainsSubset(train + held, records)
    self.assertEqual(cc.split_prose(config), (train, held))  # Deterministic.
    # Prepared data of another subset has another directory.
    self.assertNotEqual(config.name, self.config().name)


class ConfigTest(CorpusTestCase):

  @parameterized.named_parameters(
      ('fraction', 'eval_file_fraction', {'eval_file_fraction': 1.5}),
      ('fractions_sum', 'compose_file_fraction',
       {'eval_file_fraction': 0.6, 'compose_file_fraction': 0.5}),
      ('prose_fraction', 'prose_eval_fraction', {'prose_eval_fraction': 0}),
      ('max_chars', 'max_chars', {'max_chars': 4}),
      ('max_chars_type', 'max_chars', {'max_chars': 480.0}),
      ('num_code_eval', 'num_code_eval', {'num_code_eval': 0}),
      ('num_pairs_eval', 'num_pairs_eval', {'num_pairs_eval': -1}),
      ('max_files', 'max_files', {'max_files': -1}),
      ('max_prose_records', 'max_prose_records', {'max_prose_records': -1}),
      ('seed', 'seed', {'seed': -2}),
      ('stdlib_dir', 'stdlib_dir', {'stdlib_dir': '/nonexistent/stdlib'}),
  )
  def test_invalid_fields_named(self, field, fields):
    with self.assertRaisesRegex(ValueError, rf'data\.code\.{field}='):
      self.config(**fields)

  def test_missing_prose_dir(self):
    with self.assertRaisesRegex(
        ValueError, r'data\.code\.prose_dir=.*apt-get install fortunes'
        r'.*\.txt'):
      self.config(prose_dir='/nonexistent/fortunes')
    config = cc.CodeCorpusConfig(name='x', prose_dir='/nonexistent/fortunes')
    with self.assertRaisesRegex(ValueError, r'data\.code\.prose_dir'):
      cc.prepare(config, self.create_tempdir().full_path)

  def test_empty_prose_dir(self):
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, r'data\.code\.prose_dir.*found 0'):
      cc.load_prose(self.config(prose_dir=empty))

  def test_unknown_field(self):
    with self.assertRaisesRegex(ValueError, r'data\.code\.max_char\b'):
      cc.make_config(max_char=100)

  def test_names(self):
    a = self.config()
    self.assertEqual(a.name, self.config().name)
    self.assertNotEqual(a.name, self.config(seed=2).name)
    self.assertNotEqual(a.name, self.config(max_chars=200).name)

  def test_check_data_config(self):
    data_cfg = ml_collections.ConfigDict({
        'dataset': 'code_corpus', 'tokenizer': 'byte', 'seq_len': 161,
        'code': {'stdlib_dir': self.stdlib_dir, 'prose_dir': self.prose_dir,
                 'max_chars': 160}})
    config = cc.check_data_config(data_cfg)
    self.assertEqual(config.max_chars, 160)
    self.assertEqual(config.stdlib_dir, self.stdlib_dir)
    data_cfg.seq_len = 160
    with self.assertRaisesRegex(
        ValueError, r'data\.seq_len=160.*data\.code\.max_chars=160'):
      cc.check_data_config(data_cfg)
    data_cfg.tokenizer = 'other'  # Only the byte tokenizer is checked.
    cc.check_data_config(data_cfg)

  def test_unknown_split(self):
    data_cfg = ml_collections.ConfigDict({
        'tokenizer': 'byte', 'seq_len': 481,
        'code': {'stdlib_dir': self.stdlib_dir, 'prose_dir': self.prose_dir}})
    with self.assertRaisesRegex(
        ValueError, r"eval\.split='test'.*'code_eval'.*'doc2code_eval'"
        r'.*config\.eval\.split'):
      cc.source('test', data_cfg, self.create_tempdir().full_path,
                split_field='eval.split')


class TfdsTest(CorpusTestCase):

  def test_build_and_read_back(self):
    config = self.config()
    data_dir = self.create_tempdir().full_path
    builder = cc.prepare(config, data_dir)
    # doctest_eval is empty here (see test_every_split): TFDS cannot write an
    # empty split, so it is left out and `source` explains why.
    self.assertEqual(set(builder.info.splits),
                     set(cc.SPLITS) - {'doctest_eval'})
    expected = cc.generate_all(config)
    for split in ('pairs_compose', 'code_eval', 'prose_eval'):
      source = builder.as_data_source(split)
      self.assertLen(source, len(expected[split]))
      got = [{k: v.decode() for k, v in source[i].items()}
             for i in range(len(source))]
      self.assertEqual(got, expected[split])
    again = cc.prepare(config, data_dir)
    self.assertEqual(again.data_dir, builder.data_dir)
    data_cfg = ml_collections.ConfigDict({
        'tokenizer': 'byte', 'seq_len': 161, 'code': cc.config_fields(config)})
    self.assertLen(cc.source('code_eval', data_cfg, data_dir),
                   len(expected['code_eval']))
    with self.assertRaisesRegex(
        ValueError, r"eval\.split='doctest_eval': .*no doctest_eval examples"
        r'.*data\.code\.max_files'):
      cc.source('doctest_eval', data_cfg, data_dir, split_field='eval.split')

  def test_real_stdlib_round_trip(self):
    fields = dict(max_files=24, num_code_eval=16, num_pairs_eval=8)
    if not os.path.isdir(FORTUNES):
      fields['prose_dir'] = self.prose_dir  # No fortunes: the test prose.
    data_cfg = ml_collections.ConfigDict(
        {'tokenizer': 'byte', 'seq_len': 481, 'code': fields})
    data_dir = self.create_tempdir().full_path
    config = cc.check_data_config(data_cfg)
    self.assertEqual(config.stdlib_dir, '')
    files = cc.load_files(config)
    self.assertLen(files, 24)
    for f in files:
      parts = f.path.split('/')
      self.assertEmpty(set(parts[:-1]) & cc.EXCLUDED_DIRS, f.path)
    code_eval = cc.source('code_eval', data_cfg, data_dir)
    self.assertLen(code_eval, 16)
    for split in cc.SPLITS:
      source = cc.source(split, data_cfg, data_dir)
      self.assertNotEmpty(source, split)
      for i in range(min(len(source), 32)):
        ex = {k: v.decode() for k, v in source[i].items()}
        self.assertLessEqual(
            len(ex['prompt'].encode()) + len(ex['target'].encode()), 480)
    d2c = cc.source('doc2code_eval', data_cfg, data_dir)
    ex = {k: v.decode() for k, v in d2c[0].items()}
    self.assertEqual(ex['task'], 'doc2code')
    compile(ex['prompt'] + ex['target'], ex['name'], 'exec')


if __name__ == '__main__':
  absltest.main()
