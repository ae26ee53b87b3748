"""Tests for calm_jax.data: tokenizer, key-value arithmetic, grain pipelines."""

import ast
import collections
import dataclasses
import hashlib
import itertools
import json
import operator
import re
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import grain
import ml_collections
import numpy as np

from calm_jax import train
from calm_jax.data import kv_arithmetic as kv
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from experiments import kv_arithmetic as kv_experiment

SMOKE = kv.SMOKE_CONFIG
SEQ_LEN = kv.max_example_chars(SMOKE) + 1
TOKENIZER = tokenizers.ByteTokenizer()
KEY_RE = re.compile(r'[a-z]+')
# sha256 of each smoke split's examples (JSON), first 12 hex digits, as
# kv_arithmetic version 1.1.0 (git e46885c) generated them.
V1_1_0_SMOKE_DIGESTS = {
    'kv_math_compose': '704ad506344f', 'kv_math_dev': '60ea872e7d1d',
    'kv_math_eval': 'df6c4b8d0530', 'kv_subs_eval': 'c47442649ff1',
    'kv_subs_train': 'e32777a5b818', 'num_math_eval': '92ff4f26fb98',
    'num_math_train': 'f0e9410eb3a9'}


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _reference_eval(expression: str) -> int:
  """Evaluates 'a+b*c-d' via Python's own parser, independent of kv.evaluate."""
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

  def walk(node):
    if isinstance(node, ast.BinOp):
      return ops[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return node.value
    raise ValueError(f'Unexpected node {ast.dump(node)} in {expression!r}.')

  return walk(ast.parse(expression, mode='eval').body)


def _smoke_splits():
  return kv.generate_all(SMOKE)


def _data_cfg(**kv_fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'dataset': 'kv_arithmetic', 'tokenizer': 'byte', 'seq_len': SEQ_LEN,
      'kv': kv_fields or kv.config_fields(SMOKE)})


class TokenizerTest(absltest.TestCase):

  def test_round_trip_and_specials(self):
    tok = tokenizers.get_tokenizer('byte')
    self.assertEqual(tok.vocab_size, 259)
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))
    ids = tok.encode('ab+12=é')
    self.assertEqual(ids[:2], [ord('a') + 3, ord('b') + 3])
    self.assertNotIn(tok.eos_id, ids)
    self.assertEqual(tok.decode([tok.bos_id] + ids + [tok.eos_id, 50, 0]),
                     'ab+12=é')
    self.assertEqual(tok.decode([0, 1, 0xFF + 3]), '\ufffd')

  def test_char_tokenizer_one_id_per_code_point(self):
    tok = tokenizers.get_tokenizer('char')
    byte = tokenizers.get_tokenizer('byte')
    self.assertEqual(tok.vocab_size, 768 + 3)
    self.assertEqual(tok.encode('ab+12='), byte.encode('ab+12='))
    ids = tok.encode('\u00e9\u0101\u02af+3=')
    self.assertEqual(ids[:3], [0xE9 + 3, 0x101 + 3, 0x2AF + 3])
    self.assertTrue(all(i < tok.vocab_size for i in ids))
    self.assertEqual(tok.decode([tok.bos_id] + ids + [tok.eos_id, 50]),
                     '\u00e9\u0101\u02af+3=')
    with self.assertRaisesRegex(ValueError, r"U\+0416.*data\.tokenizer='byte'"):
      tok.encode('a\u0416')

  def test_char_tokenizer_of_n_code_points(self):
    tok = tokenizers.get_tokenizer('char:2048')
    self.assertEqual((tok.name, tok.vocab_size), ('char:2048', 2048 + 3))
    self.assertEqual(tok.encode('a\u0416\u07ff'), [0x61 + 3, 0x416 + 3,
                                                     0x7FF + 3])
    self.assertEqual(tok.decode(tok.encode('\u0416+3=')), '\u0416+3=')
    with self.assertRaisesRegex(ValueError, r"U\+0800.*U\+07FF"):
      tok.encode('\u0800')
    for bad in ('char:', 'char:12', 'char:x1'):
      with self.assertRaisesRegex(ValueError, r'char:N.*\[128, '):
        tokenizers.get_tokenizer(bad)

  def test_unknown_tokenizer_names_field(self):
    with self.assertRaisesRegex(ValueError, r'data\.tokenizer.*byte'):
      tokenizers.get_tokenizer('sentencepiece')


class KeyMapTest(absltest.TestCase):

  def test_keys_values_deterministic_unique_in_range(self):
    a, b = kv.make_key_map(SMOKE), kv.make_key_map(SMOKE)
    self.assertEqual(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    self.assertLen(a.keys, SMOKE.num_keys)
    self.assertLen(set(a.keys), SMOKE.num_keys)
    for key in a.keys:
      self.assertRegex(key, r'^[a-z]{2,6}$')
    self.assertLen(set(a.values.tolist()), SMOKE.num_keys)
    self.assertTrue(((a.values >= 1) & (a.values <= SMOKE.max_value)).all())
    other = kv.make_key_map(dataclasses.replace(SMOKE, seed=1))
    self.assertNotEqual(a.keys, other.keys)

  def test_shared_values_cover_small_range(self):
    config = kv.make_config(num_keys=200, max_value=9, unique_values=False)
    key_map = kv.make_key_map(config)
    self.assertLen(set(key_map.keys), 200)
    self.assertEqual(set(key_map.values.tolist()), set(range(1, 10)))
    np.testing.assert_array_equal(key_map.values,
                                  kv.make_key_map(config).values)
    example = kv.generate_split(config, 'kv_subs_eval')[0]
    self.assertRegex(example['target'], r'^[1-9]([+*-][1-9]){2,5}$')

  def test_key_alphabet(self):
    self.assertLen(kv.letters(500), 500)
    self.assertTrue(all(ord(c) < 0x300 and c.isalpha()
                        for c in kv.letters(500)))
    alphabet = kv.letters(300)
    config = kv.make_config(num_keys=300, key_min_len=1, key_max_len=1,
                            key_alphabet=alphabet, max_value=9,
                            unique_values=False, operators='+-')
    key_map = kv.make_key_map(config)
    self.assertEqual(sorted(key_map.keys), sorted(alphabet))
    self.assertEqual(key_map.keys, kv.make_key_map(config).keys)
    example = kv.generate_split(config, 'kv_math_eval')[0]
    self.assertRegex(example['prompt'], r'^\w([+-]\w){2,5}=$')
    # The default alphabet keeps the keys of configs made before it.
    self.assertEqual(kv.make_keys(kv.make_config(
        num_keys=500, max_value=9, unique_values=False))[:3],
                     ['yaqhcg', 'qvrvd', 'ulgn'])

  def test_compose_held_out_partition(self):
    key_map = kv.make_key_map(SMOKE)
    compose, held_out = set(key_map.compose), set(key_map.held_out)
    self.assertEmpty(compose & held_out)
    self.assertEqual(compose | held_out, set(range(SMOKE.num_keys)))
    self.assertLen(compose, round(SMOKE.compose_key_fraction * SMOKE.num_keys))


class ExamplesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.splits = _smoke_splits()
    key_map = kv.make_key_map(SMOKE)
    cls.values = key_map.as_dict()
    cls.compose = {key_map.keys[i] for i in key_map.compose}
    cls.held_out = {key_map.keys[i] for i in key_map.held_out}

  def test_deterministic(self):
    self.assertEqual(self.splits, _smoke_splits())
    self.assertEqual(self.splits['kv_math_eval'],
                     kv.generate_split(SMOKE, 'kv_math_eval'))

  def test_split_sizes_and_tasks(self):
    expected = {
        'kv_subs_train': ('kv_subs', SMOKE.num_kv_subs_train),
        'num_math_train': ('num_math', SMOKE.num_num_math_train),
        'kv_math_compose': ('kv_math', SMOKE.num_kv_math_compose),
        'kv_subs_eval': ('kv_subs', SMOKE.num_eval),
        'num_math_eval': ('num_math', SMOKE.num_eval),
        'kv_math_eval': ('kv_math', SMOKE.num_eval),
        'kv_math_dev': ('kv_math', SMOKE.num_eval),
        'num_copy_eval': ('num_copy', SMOKE.num_eval),
        'num_defs_eval': ('num_defs', SMOKE.num_eval),
    }
    self.assertEqual(set(self.splits), set(expected))
    for split, (task, size) in expected.items():
      self.assertLen(self.splits[split], size)
      self.assertEqual({ex['task'] for ex in self.splits[split]}, {task})

  def test_key_sets_per_split(self):
    def keys_of(split):
      return {k for ex in self.splits[split]
              for k in KEY_RE.findall(ex['prompt'])}
    self.assertLessEqual(keys_of('kv_math_compose'), self.compose)
    self.assertLessEqual(keys_of('kv_subs_eval'), self.held_out)
    self.assertLessEqual(keys_of('kv_math_eval'), self.held_out)
    self.assertLessEqual(keys_of('kv_math_dev'), self.held_out)
    # m_A's training split sees both kinds of key.
    self.assertTrue(keys_of('kv_subs_train') & self.held_out)
    self.assertTrue(keys_of('kv_subs_train') & self.compose)

  def test_eval_prompts_unseen_and_distinct(self):
    for eval_split, train_split in [('kv_subs_eval', 'kv_subs_train'),
                                    ('num_math_eval', 'num_math_train'),
                                    ('kv_math_eval', 'kv_math_compose'),
                                    ('kv_math_dev', 'kv_math_compose'),
                                    ('kv_math_dev', 'kv_math_eval'),
                                    ('num_copy_eval', 'num_math_train'),
                                    ('num_defs_eval', 'num_math_train')]:
      prompts = [ex['prompt'] for ex in self.splits[eval_split]]
      self.assertLen(set(prompts), len(prompts))
      train = {ex['prompt'] for ex in self.splits[train_split]}
      self.assertEmpty(set(prompts) & train, eval_split)

  def test_operand_counts_and_format(self):
    for examples in self.splits.values():
      for ex in examples:
        self.assertTrue(ex['prompt'].endswith('='))
        n = len(re.split(r'[-+*]', ex['prompt'][:-1]))
        self.assertBetween(n, SMOKE.min_operands, SMOKE.max_operands)

  def test_arithmetic_matches_reference(self):
    for split in ('num_math_train', 'num_math_eval'):
      for ex in self.splits[split]:
        self.assertEqual(int(ex['target']), _reference_eval(ex['prompt'][:-1]))
    for split in ('kv_subs_train', 'kv_subs_eval'):
      for ex in self.splits[split]:
        subbed = KEY_RE.sub(lambda m: str(self.values[m.group()]),
                            ex['prompt'][:-1])
        self.assertEqual(ex['target'], subbed)
    for split in ('kv_math_compose', 'kv_math_eval'):
      for ex in self.splits[split]:
        subbed = KEY_RE.sub(lambda m: str(self.values[m.group()]),
                            ex['prompt'][:-1])
        self.assertEqual(int(ex['target']), _reference_eval(subbed))

  def test_substitution_prompt_end_and_copies_in_the_anchors_data(self):
    fields = dict(kv.config_fields(SMOKE), subs_prompt_end=':',
                  num_copy_in_math=100)
    config = kv.make_config(**fields)
    splits = kv.generate_all(config)
    math_train = splits['num_math_train']
    self.assertLen(math_train, SMOKE.num_num_math_train + 100)
    copies = [ex for ex in math_train if ex['task'] == 'num_copy']
    self.assertLen(copies, 100)
    for ex in copies + splits['num_copy_eval']:
      self.assertEqual(ex['prompt'], ex['target'] + ':')
    for split in ('kv_subs_train', 'kv_subs_eval'):
      for ex in splits[split]:
        self.assertTrue(ex['prompt'].endswith(':'), ex)
        subbed = KEY_RE.sub(lambda m: str(self.values[m.group()]),
                            ex['prompt'][:-1])
        self.assertEqual(ex['target'], subbed)
    for split in ('kv_math_eval', 'num_math_eval', 'kv_math_compose'):
      self.assertTrue(all(ex['prompt'].endswith('=') for ex in splits[split]))
    # The NUM-MATH examples and every other split are the paper format's
    # (independent random streams), only KV-SUBS's prompt end differs.
    by_prompt = lambda xs: sorted(xs, key=lambda ex: ex['prompt'])
    self.assertEqual(
        by_prompt(ex for ex in math_train if ex['task'] == 'num_math'),
        by_prompt(self.splits['num_math_train']))
    self.assertEqual(splits['kv_math_eval'], self.splits['kv_math_eval'])
    self.assertEqual([ex['target'] for ex in splits['kv_subs_eval']],
                     [ex['target'] for ex in self.splits['kv_subs_eval']])
    self.assertEqual(splits['num_copy_eval'][0]['prompt'][-1], ':')
    self.assertEmpty({ex['prompt'] for ex in splits['num_copy_eval']}
                     & {ex['prompt'] for ex in copies})

  def test_splits_of_version_1_1_0_are_unchanged(self):
    # Fingerprints of the smoke config's splits before num_copy_eval and
    # the copy fields were added (git e46885c): no example moved.
    digest = lambda xs: hashlib.sha256(json.dumps(xs).encode()).hexdigest()[:12]
    got = {s: digest(self.splits[s]) for s in sorted(self.splits)
           if s not in ('num_copy_eval', 'num_defs_eval')}
    self.assertEqual(got, V1_1_0_SMOKE_DIGESTS)

  def test_copies_in_compose_are_the_anchors_first_copies(self):
    fields = dict(kv.config_fields(SMOKE), subs_prompt_end=':',
                  num_copy_in_math=100, num_math_in_compose=50)
    without = kv.generate_split(kv.make_config(**fields), 'kv_math_compose')
    config = kv.make_config(**dict(fields, num_copy_in_compose=20))
    compose = kv.generate_split(config, 'kv_math_compose')
    copies = [ex for ex in compose if ex['task'] == 'num_copy']
    self.assertLen(copies, 20)
    anchors = [ex for ex in kv.generate_split(config, 'num_math_train')
               if ex['task'] == 'num_copy']
    self.assertTrue(all(ex in anchors for ex in copies))
    by_prompt = lambda xs: sorted(xs, key=lambda ex: ex['prompt'])
    self.assertEqual(by_prompt(ex for ex in compose
                               if ex['task'] != 'num_copy'),
                     by_prompt(without))
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.num_copy_in_compose=101:'):
      kv.make_config(**dict(fields, num_copy_in_compose=101))

  def test_substitutions_in_compose_are_over_compose_keys(self):
    fields = dict(kv.config_fields(SMOKE), subs_prompt_end=':',
                  num_math_in_compose=50)
    without = kv.generate_split(kv.make_config(**fields), 'kv_math_compose')
    config = kv.make_config(**dict(fields, num_kv_subs_in_compose=30))
    compose = kv.generate_split(config, 'kv_math_compose')
    subs = [ex for ex in compose if ex['task'] == 'kv_subs']
    self.assertLen(subs, 30)
    for ex in subs:
      self.assertTrue(ex['prompt'].endswith(':'), ex)
      self.assertLessEqual(set(KEY_RE.findall(ex['prompt'])), self.compose)
      self.assertEqual(ex['target'], KEY_RE.sub(
          lambda m: str(self.values[m.group()]), ex['prompt'][:-1]))
    by_prompt = lambda xs: sorted(xs, key=lambda ex: ex['prompt'])
    self.assertEqual(by_prompt(ex for ex in compose if ex['task'] != 'kv_subs'),
                     by_prompt(without))
    # Held-out keys only in the evaluation of KV-SUBS, as before.
    self.assertEqual(kv.generate_split(config, 'kv_subs_eval'),
                     kv.generate_split(kv.make_config(**fields),
                                       'kv_subs_eval'))
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.num_kv_subs_in_compose=5:.*'
                                r'subs_prompt_end'):
      kv.make_config(**dict(kv.config_fields(SMOKE),
                            num_kv_subs_in_compose=5))

  def test_definitions_in_the_anchors_data(self):
    config = kv.make_config(**dict(kv.config_fields(SMOKE),
                                   num_defs_in_math=100,
                                   num_math_in_compose=50))
    splits = kv.generate_all(config)
    math_train = splits['num_math_train']
    self.assertLen(math_train, SMOKE.num_num_math_train + 100)
    defs = [ex for ex in math_train if ex['task'] == 'num_defs']
    self.assertLen(defs, 100)
    from_map = total = 0
    for ex in defs + splits['num_defs_eval']:
      head, expression = ex['prompt'][:-1].split(';')
      told = dict(re.findall(r'([a-z]+)(\d+)', head))
      used = KEY_RE.findall(expression)
      # Each key of the expression defined once, and nothing else.
      self.assertCountEqual(told, set(used), ex)
      self.assertLen(re.findall(r'[a-z]+', head), len(told), ex)
      self.assertEqual(int(ex['target']), _reference_eval(
          KEY_RE.sub(lambda m: told[m.group()], expression)))
      from_map += sum(int(v) == self.values[k] for k, v in told.items())
      total += len(told)
    # The values are the example's own, not the key map's (1000 values:
    # a match is a coincidence).
    self.assertLess(from_map, 0.05 * total)
    self.assertEmpty({ex['prompt'] for ex in splits['num_defs_eval']}
                     & {ex['prompt'] for ex in defs})
    # Every other example, and D_C, as without them.
    without = kv.make_config(**dict(kv.config_fields(SMOKE),
                                    num_math_in_compose=50))
    by_prompt = lambda xs: sorted(xs, key=lambda ex: ex['prompt'])
    self.assertEqual(by_prompt(ex for ex in math_train
                               if ex['task'] == 'num_math'),
                     by_prompt(self.splits['num_math_train']))
    self.assertEqual(splits['kv_math_compose'],
                     kv.generate_split(without, 'kv_math_compose'))
    self.assertGreaterEqual(kv.max_example_chars(config) + 1,
                            max(len(ex['prompt']) + len(ex['target']) + 1
                                for ex in defs))
    with self.assertRaisesRegex(ValueError, r'data\.kv\.num_defs_in_math=-1:'):
      kv.make_config(**dict(kv.config_fields(SMOKE), num_defs_in_math=-1))
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.num_defs_in_math=5:.*;'):
      kv.make_config(**dict(kv.config_fields(SMOKE), num_defs_in_math=5,
                            key_alphabet='ab;'))

  def test_num_defs_eval_is_refused_without_definitions(self):
    data_cfg = ml_collections.ConfigDict({
        'dataset': 'kv_arithmetic', 'tokenizer': 'byte', 'seq_len': 72,
        'kv': kv.config_fields(SMOKE)})
    with self.assertRaisesRegex(
        ValueError, r"^eval\.splits: 'num_defs_eval'.*num_defs_in_math=0"):
      kv.source('num_defs_eval', data_cfg, self.create_tempdir().full_path,
                'eval.splits')
    # The same line from the config check, before anything is built.
    config = kv_experiment.get_config('smoke')
    config.eval.splits = ('num_defs_eval',)
    with self.assertRaisesRegex(
        ValueError, r"^eval\.splits\[0\]: 'num_defs_eval'.*num_defs_in_math=0"):
      train.validate(config)
    # With NUM-DEFS the split is known, and data.seq_len is checked against
    # its longer examples.
    config.data.kv.num_defs_in_math = 10
    with self.assertRaisesRegex(ValueError, r'^data\.seq_len=64 is too short'):
      train.validate(config)

  def test_copies_need_their_own_prompt_end(self):
    fields = kv.config_fields(SMOKE)
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.num_copy_in_math=5:.*'
                                r'subs_prompt_end'):
      kv.make_config(**dict(fields, num_copy_in_math=5))
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.subs_prompt_end=.a.:.*alphabet'):
      kv.make_config(**dict(fields, subs_prompt_end='a'))
    with self.assertRaisesRegex(ValueError,
                                r'data\.kv\.subs_prompt_end=.\+.'):
      kv.make_config(**dict(fields, subs_prompt_end='+'))

  def test_value_alphabet_writes_each_value_as_one_character(self):
    symbols = kv.letters(SMOKE.max_value, start=0x400)
    config = kv.make_config(**dict(kv.config_fields(SMOKE),
                                   value_alphabet=symbols))
    splits = kv.generate_all(config)
    number = {c: str(i + 1) for i, c in enumerate(symbols)}
    as_numerals = lambda text: ''.join(number.get(c, c) for c in text)
    # The same examples as decimal numerals, each value one character.
    for split, examples in splits.items():
      with self.subTest(split):
        self.assertEqual(
            [{k: as_numerals(v) for k, v in ex.items()} for ex in examples],
            self.splits[split])
    for ex in splits['num_math_eval'] + splits['kv_subs_eval']:
      written = ex['prompt'] if ex['task'] == 'num_math' else ex['target']
      self.assertFalse(any(c.isdecimal() for c in written), ex)
    for ex in splits['kv_math_eval'] + splits['num_math_eval']:
      self.assertRegex(ex['target'], r'^-?[0-9]+$')
    longest = max(len(ex['prompt']) + len(ex['target'])
                  for split, exs in splits.items() for ex in exs
                  if split != 'num_defs_eval')
    self.assertLessEqual(longest, kv.max_example_chars(config))
    fields = dict(kv.config_fields(SMOKE), max_value=30)
    for alphabet, pattern in ((symbols[:29], 'has 29 characters'),
                              ('a' + symbols[:29], "'a' may not"),
                              ('7' + symbols[:29], "'7' may not"),
                              (symbols[:29] * 2, 'repeated')):
      with self.assertRaisesRegex(ValueError,
                                  r'data\.kv\.value_alphabet=.*' + pattern):
        kv.make_config(**dict(fields, num_keys=20, value_alphabet=alphabet))

  def test_precedence_and_negatives(self):
    self.assertEqual(kv.evaluate([2, 3, 4], ['+', '*']), 14)
    self.assertEqual(kv.evaluate([2, 3, 4, 5], ['*', '-', '*']), -14)
    self.assertEqual(kv.evaluate([10, 22, 24], ['+', '-']), 8)
    self.assertEqual(kv.evaluate([25_000] * 6, ['*'] * 5), 25_000**6)
    self.assertTrue(any(ex['target'].startswith('-')
                        for ex in self.splits['num_math_train']))

  def test_max_example_chars_bounds_examples(self):
    # num_defs_eval counts only where the anchor trains on NUM-DEFS
    # (test_definitions_in_the_anchors_data).
    longest = max(len(ex['prompt']) + len(ex['target'])
                  for split, exs in self.splits.items() for ex in exs
                  if split != 'num_defs_eval')
    self.assertLessEqual(longest, kv.max_example_chars(SMOKE))


class ConfigTest(parameterized.TestCase):

  def test_make_config_names(self):
    a = kv.make_config(num_keys=300, seed=3)
    self.assertEqual(a.name, kv.make_config(seed=3, num_keys=300).name)
    self.assertNotEqual(a.name, kv.make_config(num_keys=300, seed=4).name)
    self.assertIs(kv.make_config(**kv.config_fields(SMOKE)), SMOKE)
    self.assertEqual(kv.make_config().name, 'default')

  @parameterized.parameters(
      ('num_keys', dict(num_keys=700, key_max_len=2, max_value=1000)),
      ('max_value', dict(num_keys=100, max_value=50)),
      ('max_value', dict(max_value=0, unique_values=False)),
      ('unique_values', dict(unique_values='no')),
      ('compose_key_fraction', dict(compose_key_fraction=1.0)),
      ('max_operands', dict(min_operands=5, max_operands=4)),
      ('operators', dict(operators='+/')),
      ('key_alphabet', dict(key_alphabet='ab7')),
      ('key_alphabet', dict(key_alphabet='a=b')),
      ('key_alphabet', dict(key_alphabet='aba')),
      ('key_alphabet', dict(key_alphabet='')),
      ('num_keys', dict(num_keys=30, key_min_len=1, key_max_len=1,
                        max_value=30)),
      ('num_eval', dict(num_eval=0)),
      ('bogus', dict(bogus=1)),
  )
  def test_invalid_fields_named(self, field, fields):
    with self.assertRaisesRegex(ValueError, rf'data\.kv\.{field}'):
      kv.make_config(**fields)

  def test_num_math_in_compose(self):
    fields = dict(kv.config_fields(SMOKE), num_math_in_compose=64)
    config = kv.make_config(**fields)
    compose = kv.generate_split(config, 'kv_math_compose')
    splits = _smoke_splits()
    num_math = [ex for ex in compose if ex['task'] == 'num_math']
    kv_math = [ex for ex in compose if ex['task'] == 'kv_math']
    # The paper's D_C is unchanged; the anchor's own first 64 examples are
    # added, shuffled in (not all at the end).
    by_prompt = lambda exs: sorted(exs, key=lambda ex: ex['prompt'])
    self.assertEqual(by_prompt(kv_math), by_prompt(splits['kv_math_compose']))
    self.assertEqual(by_prompt(num_math),
                     by_prompt(splits['num_math_train'][:64]))
    self.assertNotEqual(compose[-64:], num_math)
    # Nothing the NUM-MATH evaluation asks is among them.
    self.assertFalse({ex['prompt'] for ex in num_math}
                     & {ex['prompt'] for ex in splits['num_math_eval']})
    with self.assertRaisesRegex(ValueError, r'data\.kv\.num_math_in_compose'):
      kv.make_config(**dict(fields, num_math_in_compose=10**6))

  def test_too_many_eval_examples(self):
    config = kv.make_config(
        num_keys=4, key_max_len=2, max_value=4, min_operands=2,
        max_operands=2, operators='+', compose_key_fraction=0.5,
        num_kv_subs_train=1, num_num_math_train=1, num_kv_math_compose=1,
        num_eval=10)
    with self.assertRaisesRegex(ValueError, r'data\.kv\.num_eval'):
      kv.generate_split(config, 'kv_math_eval')


class TfdsTest(absltest.TestCase):

  def test_build_and_read_back(self):
    data_dir = self.create_tempdir().full_path
    builder = kv.prepare(SMOKE, data_dir)
    expected = _smoke_splits()
    self.assertEqual(set(builder.info.splits), set(kv.SPLITS))
    for split in ('kv_math_compose', 'kv_math_eval'):
      source = builder.as_data_source(split)
      self.assertLen(source, len(expected[split]))
      got = [{k: v.decode() for k, v in source[i].items()}
             for i in range(len(source))]
      self.assertEqual(got, expected[split])
    # A second prepare reuses the files.
    again = kv.prepare(SMOKE, data_dir)
    self.assertEqual(again.data_dir, builder.data_dir)

  def test_one_token_keys_through_tfds(self):
    fields = dict(kv.config_fields(SMOKE), key_min_len=1, key_max_len=1,
                  key_alphabet=kv.letters(200))
    cfg = _data_cfg(**fields)
    cfg.tokenizer = 'char'
    source = pipeline.make_source('kv_arithmetic', 'kv_math_compose', cfg,
                                  self.create_tempdir().full_path)
    tok = tokenizers.get_tokenizer('char')
    example = {k: v.decode() for k, v in source[0].items()}
    row = pipeline.encode_example(example, tok, SEQ_LEN)
    # BOS, then one id per key and per operator, then '='.
    prompt = example['prompt']
    self.assertLen(tok.encode(prompt), len(prompt))
    np.testing.assert_array_equal(row['inputs'][1:len(prompt) + 1],
                                  tok.encode(prompt))
    self.assertTrue(any(ord(c) >= 0xC0 for c in prompt))

  def test_make_source_errors(self):
    data_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, r'data\.dataset.*kv_arithmetic'):
      pipeline.make_source('c4', 'train', _data_cfg(), data_dir)
    with self.assertRaisesRegex(ValueError, r'eval\.split.*kv_math_eval'):
      pipeline.make_source('kv_arithmetic', 'test', _data_cfg(), data_dir,
                           split_field='eval.split')
    cfg = _data_cfg()
    cfg.seq_len = 16
    with self.assertRaisesRegex(ValueError, r'data\.seq_len=16'):
      pipeline.make_source('kv_arithmetic', 'kv_math_eval', cfg, data_dir)
    fields = dict(kv.config_fields(SMOKE), key_min_len=1, key_max_len=1,
                  key_alphabet=kv.letters(200))
    with self.assertRaisesRegex(ValueError, r"tokenizer='char'"):
      pipeline.make_source('kv_arithmetic', 'kv_math_eval',
                           _data_cfg(**fields), data_dir)
    cfg = _data_cfg(**dict(fields, key_alphabet=kv.letters(200, 0x400)))
    cfg.tokenizer = 'char'
    with self.assertRaisesRegex(ValueError,
                                r"key_alphabet.*U\+0400.*'char:N' with N > "):
      pipeline.make_source('kv_arithmetic', 'kv_math_eval', cfg, data_dir)
    # A char tokenizer over enough code points takes them, one token each.
    cfg.tokenizer = 'char:2048'
    source = pipeline.make_source('kv_arithmetic', 'kv_math_eval', cfg,
                                  data_dir)
    prompt = source[0]['prompt'].decode()
    self.assertTrue(any(ord(c) >= 0x400 for c in prompt))
    self.assertLen(tokenizers.get_tokenizer('char:2048').encode(prompt),
                   len(prompt))


class EncodeTest(absltest.TestCase):

  def test_alignment(self):
    example = {'prompt': b'ab+cd=', 'target': b'12+345'}
    out = pipeline.encode_example(example, TOKENIZER, seq_len=20)
    self.assertEqual(out['inputs'].shape, (20,))
    self.assertEqual(out['inputs'].dtype, np.int32)
    self.assertEqual(out['weights'].dtype, np.float32)
    self.assertEqual(int(out['prompt_len']), 1 + 6)
    self.assertEqual(out['inputs'][0], TOKENIZER.bos_id)
    np.testing.assert_array_equal(out['inputs'][1:], out['targets'][:-1])
    weighted = out['targets'][out['weights'] == 1.0]
    self.assertEqual(weighted[-1], TOKENIZER.eos_id)
    self.assertEqual(TOKENIZER.decode(weighted), '12+345')
    self.assertEqual(int(out['weights'].sum()), len('12+345') + 1)
    # Weights start at the last prompt input ('='), which predicts the answer.
    self.assertEqual(np.argmax(out['weights']), out['prompt_len'] - 1)
    self.assertEqual(TOKENIZER.decode(out['inputs'][:out['prompt_len']]),
                     'ab+cd=')
    self.assertTrue((out['targets'][out['weights'] == 0][-5:] == 0).all())

  def test_exact_fit_and_too_long(self):
    example = {'prompt': 'ab=', 'target': '7'}  # BOS + 4 + EOS = 6 tokens.
    pipeline.encode_example(example, TOKENIZER, seq_len=5)
    with self.assertRaisesRegex(ValueError, r'data\.seq_len=4.*at least 5'):
      pipeline.encode_example(example, TOKENIZER, seq_len=4)

  def test_check_fits_names_the_run_field(self):
    source = [{'prompt': 'ab=', 'target': '7'},
              {'prompt': 'abcd=', 'target': '7'}]  # Needs 7 positions.
    pipeline.check_fits(source, TOKENIZER, 7, 'train.seq_len')
    with self.assertRaisesRegex(
        ValueError, r'train\.seq_len=6 is too short.*Raise train\.seq_len '
        r'to at least 7.*abcd='):
      pipeline.check_fits(source, TOKENIZER, 6, 'train.seq_len')


class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A plain list is a valid random-access source and keeps these tests off
    # the disk; TfdsTest covers the array_record path.
    cls.source = kv.generate_split(SMOKE, 'kv_subs_train')

  def _train(self, source=None, **kwargs):
    args = dict(tokenizer=TOKENIZER, seq_len=SEQ_LEN, batch_size=8, seed=0)
    return pipeline.train_dataset(
        self.source if source is None else source, **(args | kwargs))

  def _assert_same(self, batches_a, batches_b):
    self.assertLen(batches_a, len(batches_b))
    for a, b in zip(batches_a, batches_b):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])

  def test_batch_shapes(self):
    batch = next(iter(self._train()))
    self.assertEqual(batch['inputs'].shape, (8, SEQ_LEN))
    self.assertEqual(batch['targets'].shape, (8, SEQ_LEN))
    self.assertEqual(batch['weights'].shape, (8, SEQ_LEN))
    self.assertEqual(batch['prompt_len'].shape, (8,))

  def test_state_round_trip(self):
    it = iter(self._train())
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    # 80 batches of 8 cross the 512-example epoch boundary.
    expected = [next(it) for _ in range(80)]
    resumed = iter(self._train())
    resumed.set_state(state)
    self._assert_same([next(resumed) for _ in range(80)], expected)

  def test_a_split_in_memory_is_read_in_order_and_decoded_once(self):
    reads = collections.Counter()

    class Counting(list):
      def __getitem__(self, i):
        reads[i] += 1
        return list.__getitem__(self, i)

    source = Counting(self.source)
    in_memory = pipeline.train_dataset(
        source, tokenizer=TOKENIZER, seq_len=SEQ_LEN, batch_size=8, seed=0)
    # 80 batches of 8 cross the 512-example epoch boundary.
    batches = list(itertools.islice(iter(in_memory), 80))
    self.assertEqual(set(reads.values()), {1})
    self.assertLen(reads, len(source))
    # The same batches as a source too large to keep, read by threads.
    with mock.patch.object(pipeline, 'MEMO_BYTES', 0):
      self.assertFalse(pipeline.Memoized(source).fits())
      streamed = list(itertools.islice(iter(self._train()), 80))
    self._assert_same(batches, streamed)

  def test_a_bulk_source_is_checked_and_read_in_bulk_once(self):
    single, bulk = collections.Counter(), []

    class Bulk(list):  # A source with __getitems__, as TFDS's are.
      def __getitem__(self, i):
        single[i] += 1
        return list.__getitem__(self, i)

      def __getitems__(self, indices):
        bulk.append(list(indices))
        return [list.__getitem__(self, i) for i in indices]

    memo = pipeline.Memoized(Bulk(self.source))
    with mock.patch.object(pipeline, 'READ_CHUNK', 100):
      pipeline.check_fits(memo, TOKENIZER, SEQ_LEN, 'train.seq_len')
      self.assertEqual([len(b) for b in bulk],
                       [100] * (len(self.source) // 100)
                       + [len(self.source) % 100] * bool(len(self.source) % 100))
      batches = list(itertools.islice(iter(self._train(source=memo)), 80))
    # Every example read from the source once, all by the check's bulk reads.
    self.assertEqual(sorted(i for b in bulk for i in b),
                     list(range(len(self.source))))
    self.assertEmpty(single)
    # The same batches as from the plain list.
    self._assert_same(batches, list(itertools.islice(iter(self._train()), 80)))
    # Unchecked, the pipeline reads the split whole in bulk before training.
    bulk.clear()
    memo = pipeline.Memoized(Bulk(self.source))
    next(iter(self._train(source=memo)))
    self.assertEqual(sorted(i for b in bulk for i in b),
                     sorted(set(range(len(self.source))) - set(single)))
    self.assertLen(single, 16)  # `fits` samples 16 examples one by one.
    # A process reads its own shard only.
    bulk.clear()
    single.clear()
    memo = pipeline.Memoized(Bulk(self.source))
    next(iter(self._train(source=memo, shard_index=1, shard_count=2)))
    self.assertEqual(sorted(i for b in bulk for i in b),
                     sorted(set(range(1, len(self.source), 2)) - set(single)))

  def test_memoized_stops_keeping_at_its_budget(self):
    memo = pipeline.Memoized(self.source, max_bytes=100)
    self.assertEqual(memo[3], self.source[3])
    self.assertLen(memo, len(self.source))
    self.assertTrue(pipeline.Memoized(self.source).fits())
    self.assertFalse(memo.fits())
    self.assertBetween(len(memo._kept), 1, 10)  # pylint: disable=W0212

  def test_epochs_reshuffle_and_cover(self):
    it = iter(self._train(batch_size=64))
    per_epoch = len(self.source) // 64
    epochs = [[next(it) for _ in range(per_epoch)] for _ in range(2)]
    orders = [np.concatenate([b['inputs'] for b in e]) for e in epochs]
    self.assertFalse(np.array_equal(orders[0], orders[1]))
    np.testing.assert_array_equal(np.unique(orders[0], axis=0),
                                  np.unique(orders[1], axis=0))

  def test_orbax_checkpoint(self):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    it = iter(self._train())
    for _ in range(5):
      next(it)
    ckpt_dir = self.create_tempdir().full_path
    with ocp.CheckpointManager(ckpt_dir) as mngr:
      mngr.save(5, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointSave(it)))
      mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    fresh = iter(self._train())
    with ocp.CheckpointManager(ckpt_dir) as mngr:
      restored = mngr.restore(5, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(fresh)))
    self.assertIs(restored['data'], fresh)
    self._assert_same([next(fresh) for _ in range(4)], expected)

  def test_sharding_disjoint(self):
    # Distinct prompts make every example identifiable after encoding.
    source = [{'prompt': f'{i}=', 'target': '1'} for i in range(96)]
    for index in range(3):
      ds = pipeline.train_dataset(
          source, tokenizer=TOKENIZER, seq_len=8, batch_size=8, seed=0,
          shard_index=index, shard_count=3)
      it = iter(ds)
      seen = []
      for _ in range(96 // 3 // 8):  # One epoch of this shard.
        batch = next(it)
        seen += [int(TOKENIZER.decode(row[1:n - 1]))
                 for row, n in zip(batch['inputs'], batch['prompt_len'])]
      self.assertCountEqual(seen, range(index, 96, 3))
    with self.assertRaisesRegex(ValueError, 'shard_index'):
      self._train(shard_index=3, shard_count=3)

  def test_eval_batches_padding(self):
    batches = pipeline.eval_batches(self.source, tokenizer=TOKENIZER,
                                    seq_len=SEQ_LEN, batch_size=8,
                                    num_examples=21)
    self.assertLen(batches, 3)
    valid = np.concatenate([b['valid'] for b in batches])
    self.assertEqual(valid.tolist(), [True] * 21 + [False] * 3)
    last = batches[-1]
    self.assertEqual(last['weights'][5:].sum(), 0.0)
    self.assertTrue((last['weights'][:5].sum(axis=1) > 0).all())
    self.assertEqual(last['target_text'].dtype, object)
    self.assertEqual(list(last['target_text'][5:]), [''] * 3)
    texts = np.concatenate([b['target_text'] for b in batches])[:21]
    self.assertEqual(list(texts), [ex['target'] for ex in self.source[:21]])
    for b in batches:
      for k in ('inputs', 'targets', 'weights'):
        self.assertEqual(b[k].shape, (8, SEQ_LEN))
      self.assertEqual(b['prompt_len'].shape, (8,))
    again = pipeline.eval_batches(self.source, tokenizer=TOKENIZER,
                                  seq_len=SEQ_LEN, batch_size=8,
                                  num_examples=21)
    self._assert_same(again, batches)
    everything = pipeline.eval_batches(self.source, tokenizer=TOKENIZER,
                                       seq_len=SEQ_LEN, batch_size=100)
    self.assertEqual(sum(b['valid'].sum() for b in everything),
                     len(self.source))


if __name__ == '__main__':
  absltest.main()
