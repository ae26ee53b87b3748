"""CALM's low-resource-language (NTL) setting at CPU scale, over Django's PO.

The paper (Bansal et al. 2024, Sec. 4.2) composes an anchor m_B that knows
English and high-resource languages with an augmenting m_A trained on
low-resource languages, and evaluates X->English translation for the
low-resource languages X. Here the parallel text is the gettext translation
catalogs shipped in the pinned Django wheel: every
`**/locale/<lang>/LC_MESSAGES/django.po` and `djangojs.po` under the Django
package (config field `po_root`; '' means the installed package).

A *message* is (English msgid, language, msgstr). Parsing rules (`load_po`):
  * kept: translated entries (non-empty msgstr), not fuzzy, not obsolete;
  * plural entries (with a msgid_plural) are skipped: only singular entries;
  * entries whose msgid is longer than `max_msgid_chars` characters are
    dropped; the text is otherwise kept as is (format placeholders such as
    '%(name)s' and '{}' stay);
  * (lang, msgid) is de-duplicated, keeping the first occurrence (catalogs in
    sorted path order, entries in file order). Entries that differ only in
    msgctxt therefore keep one translation.
The language is the `<lang>` directory name, e.g. 'zh_Hans', 'sr_Latn'.

Languages are `high_resource` (the anchor m_B's), `low_resource` (m_A's, the
translation targets of CALM) and every other language present ('other': only
in m_A's monolingual data). Default low-resource languages: the 10 with the
most messages among af ast br cy dsb eo ga gd hsb ia io kab kk ky lb ms os sw
tt udm (messages under the default rules, Django 5.2.19; 824 distinct msgids
over all 98 languages):

  dsb 752, hsb 752, ga 748, gd 718, ky 718, ms 718, eo 704, af 692, ia 553,
  cy 546.

(Next: sw 542, os 481, br 427, kk 410, tt 393, ast 352, io 349, kab 305,
udm 200, lb 165. High-resource: fr 752, de 737, es 752, it 727, pt 717,
ru 752, zh_Hans 749, ja 752.) Sizes with the defaults: mono_train 49811,
anchor_train 10324, compose 333, eval 640, eval_high 512, mono_eval 640.

Splits are by English msgid, so that a held-out message is unseen in any
translation pair: deterministically in `seed`, a `compose_fraction` of the
distinct msgids are compose msgids, an `eval_fraction` held out (of which a
`dev_fraction` of all msgids are dev msgids, the rest eval msgids), the rest
train msgids. Examples have Text features 'prompt', 'target', 'task', 'lang':

  translate  prompt "<{lang}> {msgstr}\\n<en> "  target msgid
  mono       prompt "<{lang}> "                  target msgstr (or the msgid
                                                 for lang 'en')

The language tag of a monolingual example sits in the prompt, so the loss
(on targets only) covers the text, not the tag. Splits:

  mono_train    m_A: mono, every language, train + compose msgids.
  anchor_train  m_B: mono English (train + compose msgids), mono high-resource
                (train + compose msgids), translate high-resource (train
                msgids).
  compose       D_C: translate low-resource, compose msgids.
  eval          translate low-resource, eval msgids, at most
                `num_eval_per_lang` per language (deterministic sample).
  eval_high     the same for the high-resource languages.
  mono_eval     mono low-resource, eval msgids, capped likewise.
  dev           translate low-resource, dev msgids (a `dev_fraction` of all
                msgids, taken out of the held-out ones: no model saw them),
                capped likewise; validation for the composition, never
                scored.

Every example has len(prompt.encode()) + len(target.encode()) <= `max_chars`
(UTF-8 bytes, i.e. byte-tokenizer tokens); longer ones are dropped, never
truncated. `NtlCatalogs` writes the splits as a TFDS array_record dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
from typing import Any, NamedTuple

import ml_collections
import numpy as np
try:
  import polib  # The [ntl] extra.
except ImportError:  # Refused with the fix when the dataset is used.
  polib = None
import tensorflow_datasets as tfds

from calm_jax.data import generated

CATALOG_NAMES = ('django.po', 'djangojs.po')
TRAIN_SPLITS = ('mono_train', 'anchor_train', 'compose')
EVAL_SPLITS = ('eval', 'eval_high', 'mono_eval')
# Validation: pairs of train msgids (see `generate_all`).
DEV_SPLITS = ('dev',)
SPLITS = TRAIN_SPLITS + EVAL_SPLITS + DEV_SPLITS
ENGLISH = 'en'

DEFAULT_HIGH_RESOURCE = ('fr', 'de', 'es', 'it', 'pt', 'ru', 'zh_Hans', 'ja')
DEFAULT_LOW_RESOURCE = ('dsb', 'hsb', 'ga', 'gd', 'ky', 'ms', 'eo', 'af', 'ia',
                        'cy')

# Random streams: the msgid split, then one per capped split.
_SPLIT_STREAM = 0
_CAP_STREAMS = {'eval': 1, 'eval_high': 2, 'mono_eval': 3, 'dev': 4}


@dataclasses.dataclass(eq=False)
class NtlConfig(tfds.core.BuilderConfig):
  """Parameters of the NTL task; the config's `name` is its data directory."""

  seed: int = 0
  # Root searched for `**/locale/<lang>/LC_MESSAGES/{django,djangojs}.po`;
  # '' is the installed Django package.
  po_root: str = ''
  high_resource: tuple[str, ...] = DEFAULT_HIGH_RESOURCE
  low_resource: tuple[str, ...] = DEFAULT_LOW_RESOURCE
  # Fractions of the distinct msgids held for D_C and for evaluation.
  compose_fraction: float = 0.05
  eval_fraction: float = 0.15
  # The share of all msgids, taken out of the held-out (eval_fraction) ones,
  # that form the `dev` split instead: unseen by every model like `eval`,
  # never scored, for watching the composition train. 0 = no dev split.
  dev_fraction: float = 0.05
  # Bound on len(prompt.encode()) + len(target.encode()) of every example.
  max_chars: int = 200
  # Cap on the examples per language of each evaluation split.
  num_eval_per_lang: int = 64
  # Messages kept per language, in catalog order; 0 keeps all (tests, smoke).
  max_messages_per_lang: int = 0
  # Entries with a longer msgid (in characters) are dropped.
  max_msgid_chars: int = 100


_BASE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
FIELDS = tuple(
    f.name for f in dataclasses.fields(NtlConfig)
    if f.name not in _BASE_FIELDS
)
_LANG_FIELDS = ('high_resource', 'low_resource')


def config_fields(config: NtlConfig) -> dict[str, Any]:
  """Returns the task fields of `config` (everything except TFDS metadata)."""
  return {name: getattr(config, name) for name in FIELDS}


class Message(NamedTuple):
  """One translated catalog entry."""

  msgid: str  # English source text.
  lang: str
  msgstr: str


# --------------------------------------------------------------------------
# Catalogs.


def django_locale_root() -> str:
  """The directory of the installed Django package."""
  spec = importlib.util.find_spec('django')
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("data.ntl.po_root='' needs the Django package: pip "
                     "install -e '.[ntl]' (pins Django 5.2.19), or set "
                     'data.ntl.po_root to a directory of catalogs.')
  return list(spec.submodule_search_locations)[0]


def resolve_po_root(config: NtlConfig) -> pathlib.Path:
  return pathlib.Path(config.po_root or django_locale_root())


def find_catalogs(po_root: str | os.PathLike[str]
                  ) -> dict[str, list[pathlib.Path]]:
  """Returns lang -> its catalogs under `po_root`, in sorted path order."""
  root = pathlib.Path(po_root)
  found: dict[str, list[pathlib.Path]] = {}
  for name in CATALOG_NAMES:
    for path in root.glob(f'**/locale/*/LC_MESSAGES/{name}'):
      found.setdefault(path.parent.parent.name, []).append(path)
  return {lang: sorted(paths, key=lambda p: p.relative_to(root).as_posix())
          for lang, paths in sorted(found.items())}


def available_languages(config: NtlConfig) -> list[str]:
  """Sorted codes of the languages with at least one catalog."""
  return sorted(find_catalogs(resolve_po_root(config)))


def load_po(path: str | os.PathLike[str],
            max_msgid_chars: int) -> Iterator[tuple[str, str]]:
  """Yields (msgid, msgstr) of the kept entries of one catalog, in order."""
  for entry in polib.pofile(str(path)):
    if (entry.obsolete or entry.fuzzy or entry.msgid_plural
        or not entry.msgid or not entry.msgstr
        or len(entry.msgid) > max_msgid_chars):
      continue
    yield entry.msgid, entry.msgstr


def load_messages(config: NtlConfig) -> list[Message]:
  """Returns the messages of every language, grouped by language (sorted).

  Within a language: catalogs in sorted path order, entries in file order,
  first occurrence of each msgid, at most `max_messages_per_lang` (if > 0).
  """
  messages = []
  cap = config.max_messages_per_lang
  for lang, paths in find_catalogs(resolve_po_root(config)).items():
    # English itself and its regional variants (en_GB, en_AU, ...), whose
    # "translations" are English: they would leak English into m_A's data.
    if lang == ENGLISH or lang.startswith(ENGLISH + '_'):
      continue
    seen = set()
    for path in paths:
      for msgid, msgstr in load_po(path, config.max_msgid_chars):
        if msgid in seen:
          continue
        seen.add(msgid)
        messages.append(Message(msgid, lang, msgstr))
        if cap and len(seen) >= cap:
          break
      if cap and len(seen) >= cap:
        break
  return messages


# --------------------------------------------------------------------------
# Config.


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_config(config: NtlConfig, *, check_languages: bool = True
                    ) -> None:
  """Raises ValueError naming the first bad `data.ntl.<field>` and its fix.

  With `check_languages`, the language codes are checked against the
  catalogs under `po_root` (a directory listing, no parsing).
  """

  def fail(field: str, msg: str):
    raise ValueError(f'data.ntl.{field}={getattr(config, field)!r}: {msg}')

  for field in ('seed', 'max_chars', 'num_eval_per_lang',
                'max_messages_per_lang', 'max_msgid_chars'):
    if not _is_int(getattr(config, field)):
      fail(field, 'must be an int.')
  if config.seed < 0:
    fail('seed', 'must be >= 0.')
  if config.max_chars < 8:
    fail('max_chars', 'must be >= 8 (room for the language tags).')
  if config.num_eval_per_lang < 1:
    fail('num_eval_per_lang', 'must be >= 1.')
  if config.max_messages_per_lang < 0:
    fail('max_messages_per_lang', 'must be >= 0 (0 keeps all messages).')
  if config.max_msgid_chars < 1:
    fail('max_msgid_chars', 'must be >= 1.')
  if not isinstance(config.po_root, str):
    fail('po_root', "must be a string path ('' = the Django package).")
  for field in ('compose_fraction', 'eval_fraction'):
    frac = getattr(config, field)
    if (not isinstance(frac, (float, int)) or isinstance(frac, bool)
        or not 0.0 < frac < 1.0):
      fail(field, 'must be in (0, 1), e.g. 0.05 or 0.15.')
  dev = config.dev_fraction
  if (not isinstance(dev, (float, int)) or isinstance(dev, bool)
      or not 0.0 <= dev < config.eval_fraction):
    fail('dev_fraction', 'must be in [0, data.ntl.eval_fraction='
         f'{config.eval_fraction}): dev msgids come out of the held-out '
         'ones. E.g. 0.05, or 0 for no dev split.')
  if config.compose_fraction + config.eval_fraction >= 1.0:
    fail('eval_fraction', 'plus data.ntl.compose_fraction='
         f'{config.compose_fraction} must be < 1 to leave train msgids; '
         'lower one of them.')
  for field in _LANG_FIELDS:
    langs = getattr(config, field)
    if (not isinstance(langs, tuple) or not langs
        or not all(isinstance(x, str) for x in langs)):
      fail(field, "must be a non-empty tuple of language codes, e.g. "
           "('fr', 'de').")
    if len(set(langs)) != len(langs):
      fail(field, 'repeats a language; list each once.')
    if ENGLISH in langs:
      fail(field, f'contains {ENGLISH!r}, the source language; remove it.')
  both = sorted(set(config.high_resource) & set(config.low_resource))
  if both:
    fail('low_resource', f'shares {both} with data.ntl.high_resource; a '
         'language is either high- or low-resource. Remove it from one.')
  if check_languages:
    root = resolve_po_root(config)
    if not root.is_dir():
      fail('po_root', f'{str(root)!r} is not a directory.')
    available = available_languages(config)
    for field in _LANG_FIELDS:
      unknown = [x for x in getattr(config, field) if x not in available]
      if unknown:
        fail(field, f'unknown language codes {unknown}: no '
             f'locale/<lang>/LC_MESSAGES/{{{",".join(CATALOG_NAMES)}}} under '
             f'{str(root)!r}. Available codes: {available}.')


def _source_version(config: NtlConfig) -> str:
  """What identifies the catalogs besides `po_root`: the Django version."""
  if config.po_root:
    return ''
  try:
    return importlib.metadata.version('django')
  except importlib.metadata.PackageNotFoundError:
    return ''


def make_config(**fields: Any) -> NtlConfig:
  """Returns a validated config whose name is a function of all its fields.

  Lists are accepted for the language fields. Equal fields (and, for the
  default `po_root`, the same Django version) give the same name, so prepared
  data is reused; different fields a different directory.
  """
  for field in fields:
    if field not in FIELDS:
      raise ValueError(f'Unknown field data.ntl.{field}. Known fields: '
                       f'{list(FIELDS)}. Remove it or fix its spelling.')
  for field in _LANG_FIELDS:
    if isinstance(fields.get(field), list):
      fields[field] = tuple(fields[field])
  config = NtlConfig(name='unnamed', **fields)
  validate_config(config)
  values = config_fields(config)
  key = dict(values, source_version=_source_version(config))
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  config.name = f's{config.seed}_c{config.max_chars}_{digest}'
  config.description = f'Custom: {values}'
  return config


def check_data_config(data_cfg: ml_collections.ConfigDict) -> NtlConfig:
  """The validated config of `data.ntl`, checked against data.seq_len."""
  if polib is None:
    raise ValueError("data.dataset='ntl_catalogs' reads gettext catalogs with "
                     "polib: pip install -e '.[ntl]'.")
  fields = generated.subconfig_fields(data_cfg, 'ntl')
  for field in _LANG_FIELDS:
    if isinstance(fields.get(field), list):
      fields[field] = tuple(fields[field])
  config = make_config(**fields)
  generated.check_seq_len_fits(data_cfg, 'ntl', config.max_chars)
  return config


# --------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass(frozen=True)
class MsgidSplit:
  """The distinct msgids (sorted) by role."""

  train: frozenset[str]
  compose: frozenset[str]
  eval: frozenset[str]
  dev: frozenset[str] = frozenset()


def split_msgids(config: NtlConfig, msgids: Sequence[str]) -> MsgidSplit:
  """Splits the distinct `msgids` into compose / dev / eval / train."""
  ordered = sorted(set(msgids))
  n = len(ordered)
  n_compose = int(round(config.compose_fraction * n))
  n_eval = int(round(config.eval_fraction * n))
  n_dev = min(int(round(config.dev_fraction * n)), n_eval - 1)
  if min(n_compose, n_eval, n - n_compose - n_eval) < 1:
    raise ValueError(
        f'data.ntl: {n} distinct msgids give {n_compose} compose, {n_eval} '
        f'eval and {n - n_compose - n_eval} train msgids; each needs >= 1. '
        'Raise data.ntl.compose_fraction / eval_fraction or '
        'data.ntl.max_messages_per_lang (0 = all).')
  perm = np.random.default_rng([config.seed, _SPLIT_STREAM]).permutation(n)

  def pick(idx: np.ndarray) -> frozenset[str]:
    return frozenset(ordered[i] for i in idx)

  return MsgidSplit(
      compose=pick(perm[:n_compose]),
      dev=pick(perm[n_compose:n_compose + n_dev]),
      eval=pick(perm[n_compose + n_dev:n_compose + n_eval]),
      train=pick(perm[n_compose + n_eval:]))


def tag(lang: str) -> str:
  return f'<{lang}> '


def translate_example(m: Message) -> dict[str, str]:
  return {'prompt': f'{tag(m.lang)}{m.msgstr}\n{tag(ENGLISH)}',
          'target': m.msgid, 'task': 'translate', 'lang': m.lang}


def mono_example(m: Message) -> dict[str, str]:
  return {'prompt': tag(m.lang), 'target': m.msgstr, 'task': 'mono',
          'lang': m.lang}


def english_example(msgid: str) -> dict[str, str]:
  return {'prompt': tag(ENGLISH), 'target': msgid, 'task': 'mono',
          'lang': ENGLISH}


def example_bytes(example: dict[str, str]) -> int:
  return len(example['prompt'].encode()) + len(example['target'].encode())


def _lang_stream(lang: str) -> int:
  return int.from_bytes(hashlib.sha256(lang.encode()).digest()[:4], 'little')


def _capped(config: NtlConfig, split: str, examples: list[dict[str, str]],
            lang: str) -> list[dict[str, str]]:
  """A deterministic sample of at most num_eval_per_lang, in input order."""
  cap = config.num_eval_per_lang
  if len(examples) <= cap:
    return examples
  rng = np.random.default_rng(
      [config.seed, _CAP_STREAMS[split], _lang_stream(lang)])
  keep = np.sort(rng.choice(len(examples), size=cap, replace=False))
  return [examples[i] for i in keep]


def generate_all(config: NtlConfig, messages: Sequence[Message] | None = None
                 ) -> dict[str, list[dict[str, str]]]:
  """Returns every split, deterministic in the config (and the catalogs).

  Order: languages as in `messages` (sorted), msgids sorted within each; the
  English monolingual examples of `anchor_train` come first.
  """
  if messages is None:
    messages = load_messages(config)
  by_lang: dict[str, list[Message]] = {}
  for m in messages:
    by_lang.setdefault(m.lang, []).append(m)
  for lang in by_lang:
    by_lang[lang].sort(key=lambda m: m.msgid)
  roles = split_msgids(config, [m.msgid for m in messages])
  seen = roles.train | roles.compose
  high, low = set(config.high_resource), set(config.low_resource)

  def select(langs, msgids, make):
    out = []
    for lang, msgs in by_lang.items():
      if lang in langs:
        out += [make(m) for m in msgs if m.msgid in msgids]
    return out

  def capped(split, langs, msgids, make):
    out = []
    for lang, msgs in by_lang.items():
      if lang in langs:
        exs = [make(m) for m in msgs if m.msgid in msgids]
        exs = [ex for ex in exs if example_bytes(ex) <= config.max_chars]
        out += _capped(config, split, exs, lang)
    return out

  splits = {
      'mono_train': select(by_lang.keys(), seen, mono_example),
      'anchor_train': (
          [english_example(x) for x in sorted(seen)]
          + select(high, seen, mono_example)
          + select(high, roles.train, translate_example)),
      'compose': select(low, roles.compose, translate_example),
      'eval': capped('eval', low, roles.eval, translate_example),
      'eval_high': capped('eval_high', high, roles.eval, translate_example),
      'mono_eval': capped('mono_eval', low, roles.eval, mono_example),
      # Validation for the composition (e.g. eval.during_training_split):
      # held out like `eval` (no model saw either side), disjoint from it.
      'dev': capped('dev', low, roles.dev, translate_example),
  }
  return {name: [ex for ex in exs if example_bytes(ex) <= config.max_chars]
          for name, exs in splits.items()}


# --------------------------------------------------------------------------
# TFDS builder.


class NtlCatalogs(generated.GeneratedText):
  """CALM NTL setting: X->English translation over Django's catalogs."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'The `dev` split (composition validation).'}
  TEXT_FIELDS = ('prompt', 'target', 'task', 'lang')

  def generate_splits(self) -> dict[str, list[dict[str, str]]]:
    validate_config(self.builder_config)
    return generate_all(self.builder_config)


def prepare(config: NtlConfig, data_dir: str) -> NtlCatalogs:
  """Returns the builder of `config`, generating the data if not on disk."""
  validate_config(config)
  return generated.prepare(NtlCatalogs, config, data_dir)


def source(split: str, data_cfg: ml_collections.ConfigDict, data_dir: str,
           split_field: str) -> Sequence[Any]:
  """Prepares the data of `data_cfg.ntl` if needed; returns one split."""
  if split not in SPLITS:
    raise ValueError(
        f"Unknown split {split_field}={split!r} for the NTL dataset. Valid "
        f'splits: {list(SPLITS)}. Set config.{split_field} to one of them.')
  builder = prepare(check_data_config(data_cfg), data_dir)
  return generated.data_source(
      builder, split, split_field,
      'too few messages per language, or too small a data.ntl.max_chars. '
      'Raise data.ntl.max_messages_per_lang (0 = all) or data.ntl.max_chars,'
      ' or add languages to data.ntl.low_resource / high_resource.')
