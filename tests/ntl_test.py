"""Tests for calm_jax.data.ntl: Django-catalog NTL splits and their builder."""

import collections
import os

from absl import flags
from absl.testing import absltest
import ml_collections
import polib

from calm_jax.data import ntl

NUM_MSGIDS = 24
HIGH = ('fr',)
LOW = ('br', 'cy')
OTHER = 'eo'
MAX_CHARS = 60
# Long enough for a mono example, too long for its translation example.
LONG = 'x' * 40


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _msgid(i: int) -> str:
  return f'Message {i}'


def _msgstr(lang: str, i: int) -> str:
  # Every fourth message has a long translation (dropped as translate pair).
  return f'{lang} {i}' + (LONG if i % 4 == 3 else '')


def _write(path: str, entries: list[polib.POEntry]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  po = polib.POFile()
  po.metadata = {'Content-Type': 'text/plain; charset=UTF-8'}
  for entry in entries:
    po.append(entry)
  po.save(path)


def _write_po_root(root: str) -> None:
  """Django-like layout: two apps, django.po and djangojs.po, plus 'en'."""
  for lang in HIGH + LOW + (OTHER,):
    half = NUM_MSGIDS // 2
    entries = [polib.POEntry(msgid=_msgid(i), msgstr=_msgstr(lang, i))
               for i in range(half)]
    entries += [
        polib.POEntry(msgid='Fuzzy', msgstr='fuzzy', flags=['fuzzy']),
        polib.POEntry(msgid='Untranslated', msgstr=''),
        polib.POEntry(msgid='%d item', msgid_plural='%d items',
                      msgstr_plural={0: 'one', 1: 'many'}),
        polib.POEntry(msgid='Obsolete', msgstr='obsolete', obsolete=True),
        polib.POEntry(msgid='L' * 40, msgstr='too long msgid'),
    ]
    _write(os.path.join(root, 'conf/locale', lang, 'LC_MESSAGES/django.po'),
           entries)
    # A duplicate of message 0 (later in path order: ignored) and the rest.
    entries = [polib.POEntry(msgid=_msgid(0), msgstr='duplicate')]
    entries += [polib.POEntry(msgid=_msgid(i), msgstr=_msgstr(lang, i))
                for i in range(half, NUM_MSGIDS)]
    _write(os.path.join(root, 'contrib/admin/locale', lang,
                        'LC_MESSAGES/djangojs.po'), entries)
  _write(os.path.join(root, 'conf/locale/en/LC_MESSAGES/django.po'),
         [polib.POEntry(msgid=_msgid(0), msgstr='')])


class NtlTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.po_root = self.create_tempdir().full_path
    _write_po_root(self.po_root)
    self.config = self.make(seed=3)

  def make(self, **fields) -> ntl.NtlConfig:
    defaults = dict(
        po_root=self.po_root, high_resource=HIGH, low_resource=LOW,
        compose_fraction=0.25, eval_fraction=0.25, dev_fraction=0.1,
        max_chars=MAX_CHARS,
        num_eval_per_lang=4, max_msgid_chars=30)
    return ntl.make_config(**{**defaults, **fields})

  def test_parsing_rules(self):
    messages = ntl.load_messages(self.config)
    self.assertEqual(sorted({m.lang for m in messages}),
                     sorted(HIGH + LOW + (OTHER,)))
    self.assertEqual(
        collections.Counter(m.lang for m in messages),
        {lang: NUM_MSGIDS for lang in HIGH + LOW + (OTHER,)})
    # Fuzzy, untranslated, plural, obsolete and long-msgid entries dropped.
    self.assertEqual({m.msgid for m in messages},
                     {_msgid(i) for i in range(NUM_MSGIDS)})
    # Duplicates keep the first catalog's translation.
    for m in messages:
      self.assertEqual(m.msgstr, _msgstr(m.lang, int(m.msgid.split()[1])))

  def test_max_messages_per_lang(self):
    messages = ntl.load_messages(self.make(max_messages_per_lang=5))
    self.assertEqual(collections.Counter(m.lang for m in messages),
                     {lang: 5 for lang in HIGH + LOW + (OTHER,)})
    self.assertEqual({m.msgid for m in messages},
                     {_msgid(i) for i in range(5)})

  def test_splits(self):
    splits = ntl.generate_all(self.config)
    self.assertEqual(set(splits), set(ntl.SPLITS))
    messages = ntl.load_messages(self.config)
    roles = ntl.split_msgids(self.config, [m.msgid for m in messages])
    self.assertLen(roles.compose, 6)
    self.assertLen(roles.dev, 2)  # round(0.1 * 24), out of the 6 held out.
    self.assertLen(roles.eval, 4)
    self.assertLen(roles.train, NUM_MSGIDS - 12)
    self.assertEmpty(roles.compose & (roles.eval | roles.dev))
    self.assertEmpty(roles.eval & roles.dev)
    self.assertEmpty(roles.train & (roles.compose | roles.eval | roles.dev))
    msgid_of = {(m.lang, m.msgstr): m.msgid for m in messages}

    def msgid(ex):
      if ex['task'] == 'translate' or ex['lang'] == 'en':
        return ex['target']
      return msgid_of[ex['lang'], ex['target']]

    for name, examples in splits.items():
      self.assertNotEmpty(examples, name)
      for ex in examples:
        self.assertLessEqual(
            len(ex['prompt'].encode()) + len(ex['target'].encode()),
            MAX_CHARS)
        role = ('eval' if msgid(ex) in roles.eval else
                'dev' if msgid(ex) in roles.dev else
                'compose' if msgid(ex) in roles.compose else 'train')
        if name in ntl.EVAL_SPLITS:
          self.assertEqual(role, 'eval', (name, ex))
        elif name in ntl.DEV_SPLITS:
          self.assertEqual(role, 'dev', (name, ex))
        else:
          self.assertIn(role, ('compose', 'train'), (name, ex))
    # Languages and tasks per split.

    def langs(name):
      return {ex['lang'] for ex in splits[name]}

    def tasks(name):
      return {ex['task'] for ex in splits[name]}

    self.assertEqual(langs('mono_train'), set(HIGH + LOW + (OTHER,)))
    self.assertEqual(tasks('mono_train'), {'mono'})
    self.assertEqual(langs('compose'), set(LOW))
    self.assertEqual(langs('eval'), set(LOW))
    self.assertEqual(langs('mono_eval'), set(LOW))
    self.assertEqual(langs('eval_high'), set(HIGH))
    self.assertEqual(langs('dev'), set(LOW))
    self.assertEqual(tasks('compose') | tasks('eval') | tasks('eval_high')
                     | tasks('dev'), {'translate'})
    self.assertEqual(tasks('mono_eval'), {'mono'})
    for ex in splits['compose']:
      self.assertIn(msgid(ex), roles.compose)
    anchor = splits['anchor_train']
    self.assertEqual(
        {ex['lang'] for ex in anchor if ex['task'] == 'translate'}, set(HIGH))
    self.assertEqual(
        {ex['target'] for ex in anchor if ex['lang'] == 'en'},
        roles.train | roles.compose)
    for ex in anchor:
      if ex['task'] == 'translate':
        self.assertIn(msgid(ex), roles.train)
    # Monolingual m_A data: every non-eval message of every language.
    self.assertLen(splits['mono_train'],
                   4 * len(roles.train | roles.compose))

  def test_formats_and_max_chars_drops(self):
    splits = ntl.generate_all(self.config)
    ex = splits['compose'][0]
    self.assertEqual(ex['prompt'], f"<{ex['lang']}> "
                     f"{_msgstr(ex['lang'], int(ex['target'].split()[1]))}"
                     '\n<en> ')
    mono = splits['mono_train'][0]
    self.assertEqual(mono['prompt'], f"<{mono['lang']}> ")
    # Long translations fit as mono text but are dropped as translate pairs.
    self.assertTrue(any(LONG in ex['target'] for ex in splits['mono_train']))
    for name in ('anchor_train', 'compose', 'eval', 'eval_high'):
      for ex in splits[name]:
        self.assertNotIn(LONG, ex['prompt'])
    loose = ntl.generate_all(self.make(seed=3, max_chars=200))
    self.assertGreater(len(loose['compose']), len(splits['compose']))

  def test_eval_cap_and_determinism(self):
    splits = ntl.generate_all(self.config)
    for name in ntl.EVAL_SPLITS + ntl.DEV_SPLITS:
      counts = collections.Counter(ex['lang'] for ex in splits[name])
      self.assertLessEqual(max(counts.values()), 4)
    self.assertEqual(collections.Counter(
        ex['lang'] for ex in splits['mono_eval']), {lang: 4 for lang in LOW})
    self.assertEqual(ntl.generate_all(self.make(seed=3)), splits)
    self.assertNotEqual(ntl.generate_all(self.make(seed=4)), splits)

  def test_make_config_names(self):
    self.assertEqual(self.make(seed=3).name, self.config.name)
    self.assertNotEqual(self.make(seed=4).name, self.config.name)
    from_list = self.make(seed=3, low_resource=list(LOW))
    self.assertEqual(from_list.low_resource, LOW)
    self.assertEqual(from_list.name, self.config.name)

  def test_errors(self):
    with self.assertRaisesRegex(
        ValueError, r"data\.ntl\.low_resource.*'xx'.*Available codes: "
        r"\['br', 'cy', 'en', 'eo', 'fr'\]"):
      self.make(low_resource=('cy', 'xx'))
    with self.assertRaisesRegex(ValueError,
                                r"data\.ntl\.low_resource.*\['fr'\].*high"):
      self.make(low_resource=('fr', 'cy'))
    with self.assertRaisesRegex(ValueError, r'data\.ntl\.compose_fraction'):
      self.make(compose_fraction=0.0)
    with self.assertRaisesRegex(ValueError, r'data\.ntl\.eval_fraction'):
      self.make(eval_fraction=1.5)
    with self.assertRaisesRegex(
        ValueError, r'data\.ntl\.dev_fraction.*out of the held-out'):
      self.make(dev_fraction=0.3)  # More than eval_fraction=0.25.
    no_dev = ntl.generate_all(self.make(dev_fraction=0.0))
    self.assertEmpty(no_dev['dev'])
    with self.assertRaisesRegex(ValueError,
                                r'data\.ntl\.eval_fraction.*must be < 1'):
      self.make(compose_fraction=0.5, eval_fraction=0.5)
    with self.assertRaisesRegex(ValueError, r'Unknown field data\.ntl\.sed'):
      self.make(sed=1)
    with self.assertRaisesRegex(ValueError, r'data\.ntl.*Raise'):
      ntl.generate_all(self.make(max_messages_per_lang=2))

  def test_check_data_config_and_source_errors(self):
    fields = ntl.config_fields(self.config)
    data_cfg = ml_collections.ConfigDict({
        'tokenizer': 'byte', 'seq_len': MAX_CHARS + 1,
        'ntl': {**fields, 'high_resource': list(HIGH)}})
    self.assertEqual(ntl.check_data_config(data_cfg).name, self.config.name)
    data_cfg.seq_len = MAX_CHARS
    with self.assertRaisesRegex(
        ValueError, r'data\.seq_len=60.*data\.ntl\.max_chars=60'):
      ntl.check_data_config(data_cfg)
    with self.assertRaisesRegex(
        ValueError, r"eval\.split='test'.*'eval_high'.*config\.eval\.split"):
      ntl.source('test', data_cfg, self.create_tempdir().full_path,
                 'eval.split')


class DjangoTest(absltest.TestCase):

  def test_prepare_round_trip(self):
    config = ntl.make_config(max_messages_per_lang=30, compose_fraction=0.2,
                             eval_fraction=0.3, num_eval_per_lang=3)
    expected = ntl.generate_all(config)
    for name in ntl.SPLITS:
      self.assertNotEmpty(expected[name], name)
    self.assertEqual({ex['lang'] for ex in expected['compose']},
                     set(ntl.DEFAULT_LOW_RESOURCE))
    data_dir = self.create_tempdir().full_path
    data_cfg = ml_collections.ConfigDict({
        'tokenizer': 'byte', 'seq_len': 201,
        'ntl': ntl.config_fields(config)})
    for split in ('compose', 'eval_high'):
      source = ntl.source(split, data_cfg, data_dir, 'train.split')
      self.assertLen(source, len(expected[split]))
      got = [{k: v.decode() for k, v in source[i].items()}
             for i in range(len(source))]
      self.assertEqual(got, expected[split])
    again = ntl.prepare(config, data_dir)
    self.assertEqual(set(again.info.splits), set(ntl.SPLITS))
    self.assertEqual(len(again.as_data_source('mono_train')),
                     len(expected['mono_train']))


if __name__ == '__main__':
  absltest.main()
