"""The key-value arithmetic task of CALM (Bansal et al. 2024, Table 1).

A fixed map assigns each key (a string of 2-6 lowercase letters) a unique
integer value. Expressions of 3-6 operands with `+ - *` give three tasks:

  KV-SUBS   prompt "abc+de*fgh="  target "10+22*24"   (m_A's skill)
  NUM-MATH  prompt "10+22*24="    target "538"        (m_B's skill)
  KV-MATH   prompt "abc+de*fgh="  target "538"        (the composed skill)

KV-SUBS and KV-MATH share their prompts in the paper's format. With
`subs_prompt_end` (e.g. ':') a substitution prompt ends with that
character instead of '=', and `num_copy_in_math` NUM-COPY examples
(prompt "10+22*24:", target "10+22*24") join the anchor's NUM-MATH data:
an anchor that can rewrite an expression it is shown, so that a composed
model can be asked for KV-SUBS (`num_copy_eval` scores the copying).

With `num_defs_in_math` NUM-DEFS examples join the anchor's data: an
expression over keys after definitions of their values, drawn at random for
each example (prompt "x5y3;x+y-x=", target "3"), so that the anchor learns
to compute with values it is told about keys, and trains its embeddings of
them, without ever seeing the key map (`num_defs_eval` scores it).

With `value_alphabet` each value is one character (value v is its v-th),
wherever a value is written (NUM-MATH and NUM-COPY operands, KV-SUBS
targets); answers stay decimal numerals. Values beyond one digit then stay
one token, as one-character keys are, so that values can spread wider than
1-9 and a key-blind guess of a likely sum becomes rarer.

Results follow standard precedence (`*` before `+`/`-`, left to right
otherwise), may be negative, and are exact Python ints. The text is compact
(no spaces) so that a byte tokenizer sees one token per character.

Keys are split once: `compose_key_fraction` of them are "compose keys", the
only keys in the composition set D_C (`kv_math_compose`); the rest are
"held-out keys", the only keys in the KV evaluation splits. m_A's training
split `kv_subs_train` covers all keys, so CALM can only solve KV-MATH on the
held-out keys by reading m_A's knowledge through the composition.

Generation is pure Python/numpy (`make_keys`, `generate_split`, ...) and
deterministic in `seed`; `KvArithmetic` wraps it as a TFDS builder written to
array_record so that grain reads it with random access.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from calm_jax.data import generated
from calm_jax.data import tokenizers

ALLOWED_OPERATORS = '+-*'

TRAIN_SPLITS = ('kv_subs_train', 'num_math_train', 'kv_math_compose')
EVAL_SPLITS = ('kv_subs_eval', 'num_math_eval', 'kv_math_eval',
               'num_copy_eval', 'num_defs_eval')
# KV-MATH over held-out keys, disjoint from D_C and from kv_math_eval: what
# training curves are watched on, so that no schedule is chosen on eval.
DEV_SPLITS = ('kv_math_dev',)
SPLITS = TRAIN_SPLITS + EVAL_SPLITS + DEV_SPLITS

# split -> (task, operand pool, size field, splits whose prompts to avoid).
_SPLIT_SPECS = {
    'kv_subs_train': ('kv_subs', 'all_keys', 'num_kv_subs_train', ()),
    'num_math_train': ('num_math', 'numbers', 'num_num_math_train', ()),
    'kv_math_compose': ('kv_math', 'compose_keys', 'num_kv_math_compose', ()),
    'kv_subs_eval': ('kv_subs', 'held_out_keys', 'num_eval',
                     ('kv_subs_train',)),
    'num_math_eval': ('num_math', 'numbers', 'num_eval', ('num_math_train',)),
    'kv_math_eval': ('kv_math', 'held_out_keys', 'num_eval',
                     ('kv_math_compose',)),
    'kv_math_dev': ('kv_math', 'held_out_keys', 'num_eval',
                    ('kv_math_compose', 'kv_math_eval')),
    'num_copy_eval': ('num_copy', 'numbers', 'num_eval', ('num_math_train',)),
    'num_defs_eval': ('num_defs', 'all_keys', 'num_eval', ('num_math_train',)),
}

# Independent random streams, so that e.g. changing a split size leaves the
# key map and every other split unchanged. Numbered in the splits' order of
# version 1.1.0; a split added later takes a number of its own, so that no
# existing split's examples change.
_STREAMS = {name: i + 2 for i, name in enumerate(
    ('kv_subs_train', 'num_math_train', 'kv_math_compose', 'kv_subs_eval',
     'num_math_eval', 'kv_math_eval', 'kv_math_dev'))}
_STREAMS['num_copy_eval'] = 1003
_KEYS_STREAM, _KEY_SPLIT_STREAM = 0, 1
_MIX_STREAM = 1000
_COPY_STREAM, _COPY_MIX_STREAM = 1001, 1002
_SUBS_IN_COMPOSE_STREAM = 1004
_STREAMS['num_defs_eval'] = 1005
_DEFS_STREAM, _DEFS_MIX_STREAM = 1006, 1007


@dataclasses.dataclass(eq=False)
class KvArithmeticConfig(tfds.core.BuilderConfig):
  """Parameters of the task; the config's `name` is its data directory."""

  # Number of distinct keys (the paper uses 25K).
  num_keys: int = 25_000
  # Key lengths, in characters, inclusive.
  key_min_len: int = 2
  key_max_len: int = 6
  # Characters keys are made of (the paper: letters). Printable characters
  # other than digits, operators, '=' and whitespace, so that a key never
  # reads as part of a numeral or an expression; non-ASCII ones need
  # data.tokenizer='char' (see `letters`).
  key_alphabet: str = 'abcdefghijklmnopqrstuvwxyz'
  # Values are integers in [1, max_value]: distinct (one key per value, the
  # paper's map) when `unique_values`, else drawn uniformly with replacement,
  # which lets many keys share small values (CPU-scale arithmetic).
  max_value: int = 25_000
  unique_values: bool = True
  # Operands per expression, inclusive.
  min_operands: int = 3
  max_operands: int = 6
  # Operators drawn uniformly from this string (a subset of '+-*').
  operators: str = '+-*'
  # Fraction of keys usable in the composition set D_C (the paper uses 20%).
  compose_key_fraction: float = 0.2
  seed: int = 0
  # Examples per split (ours: the paper does not report split sizes).
  num_kv_subs_train: int = 250_000
  num_num_math_train: int = 250_000
  num_kv_math_compose: int = 25_000
  num_eval: int = 2_000  # Per evaluation split.
  # NUM-MATH examples of the anchor's own training data (the first ones of
  # `num_math_train`) mixed into D_C (`kv_math_compose`), shuffled in. Not
  # the paper's D_C (KV-MATH only): it shows the bridges what the anchor
  # already does, so that they learn to leave it alone.
  num_math_in_compose: int = 0
  # The character that ends a substitution prompt (KV-SUBS, NUM-COPY): '='
  # is the paper's format, where KV-SUBS and KV-MATH prompts are the same
  # text; another (e.g. ':') tells the two tasks apart.
  subs_prompt_end: str = '='
  # NUM-COPY examples shuffled into `num_math_train` (the anchor's data):
  # prompt "10+22*24" + subs_prompt_end, target "10+22*24".
  num_copy_in_math: int = 0
  # Of those copies, how many (the first ones) also join D_C, beside
  # `num_math_in_compose` NUM-MATH examples.
  num_copy_in_compose: int = 0
  # KV-SUBS examples over the compose keys (prompts ending in
  # subs_prompt_end) shuffled into D_C: the substitution shown on D_C's keys
  # only, as KV-MATH is; kv_subs_eval asks it on held-out keys. Not the
  # paper's D_C (KV-MATH only).
  num_kv_subs_in_compose: int = 0
  # NUM-DEFS examples shuffled into `num_math_train` (the anchor's data):
  # arithmetic over keys whose values the prompt defines, drawn at random
  # for each example (never the key map), e.g. prompt "x5y3;x+y-x=",
  # target "3". The anchor learns to compute with values it is told about
  # keys, and its embeddings of the keys are trained, while nothing in its
  # data ties a key to its value. `num_defs_eval` scores it.
  num_defs_in_math: int = 0
  # Characters that write the values 1..max_value, one each (value v is the
  # v-th), in prompts and substitutions; '' writes decimal numerals.
  # Answers (NUM-MATH, KV-MATH) are decimal either way.
  value_alphabet: str = ''


_BASE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
FIELDS = tuple(
    f.name for f in dataclasses.fields(KvArithmeticConfig)
    if f.name not in _BASE_FIELDS
)


def config_fields(config: KvArithmeticConfig) -> dict[str, Any]:
  """Returns the task fields of `config` (everything except TFDS metadata)."""
  return {name: getattr(config, name) for name in FIELDS}


# Printable ASCII that may not appear in a key: digits, '=', space and every
# operator (even ones a config leaves out, so that datasets stay comparable).
_RESERVED_KEY_CHARS = frozenset('0123456789= ' + ALLOWED_OPERATORS)


def _reserved(char: str) -> bool:
  """Whether `char` may not stand for a key or a value: it is not printable,
  or is whitespace, a digit, '=' or an operator."""
  return (not char.isprintable() or char.isspace() or char.isdecimal() or
          char in _RESERVED_KEY_CHARS)


def num_possible_keys(min_len: int, max_len: int, alphabet_size: int = 26
                      ) -> int:
  """Number of distinct strings over an alphabet with length in [min, max]."""
  return sum(alphabet_size**n for n in range(min_len, max_len + 1))


def num_compose_keys(config: KvArithmeticConfig) -> int:
  return int(round(config.compose_key_fraction * config.num_keys))


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_config(config: KvArithmeticConfig) -> None:
  """Raises ValueError naming the first bad `data.kv.<field>` and its fix."""

  def fail(field: str, msg: str):
    raise ValueError(f'data.kv.{field}={getattr(config, field)!r}: {msg}')

  for field in FIELDS:
    if field not in ('operators', 'compose_key_fraction', 'unique_values',
                     'key_alphabet', 'subs_prompt_end', 'value_alphabet'
                     ) and not _is_int(
                         getattr(config, field)):
      fail(field, 'must be an int.')
  if not isinstance(config.unique_values, (bool, np.bool_)):
    fail('unique_values', 'must be True or False.')
  if config.key_min_len < 1:
    fail('key_min_len', 'must be >= 1.')
  if config.key_max_len < config.key_min_len:
    fail('key_max_len',
         f'must be >= data.kv.key_min_len={config.key_min_len}.')
  if config.num_keys < 2:
    fail('num_keys', 'must be >= 2 (one compose and one held-out key).')
  alphabet = config.key_alphabet
  if not isinstance(alphabet, str) or not alphabet:
    fail('key_alphabet', 'must be a non-empty string of characters.')
  for char in alphabet:
    if _reserved(char):
      fail('key_alphabet', f'{char!r} may not appear in a key; use printable '
           "characters other than digits, '=', whitespace and "
           f'{ALLOWED_OPERATORS!r}.')
  if len(set(alphabet)) != len(alphabet):
    fail('key_alphabet', 'contains a repeated character; list each once.')
  capacity = num_possible_keys(config.key_min_len, config.key_max_len,
                               len(alphabet))
  if config.num_keys > capacity:
    fail('num_keys', f'only {capacity} distinct keys of '
         f'{config.key_min_len}-{config.key_max_len} characters over '
         f'data.kv.key_alphabet ({len(alphabet)} characters) exist; lower '
         'num_keys, raise data.kv.key_max_len or extend the alphabet.')
  if config.max_value < 1:
    fail('max_value', 'must be >= 1.')
  if config.unique_values and config.max_value < config.num_keys:
    fail('max_value', f'must be >= data.kv.num_keys={config.num_keys} so that '
         'every key gets a unique value; raise it, or set '
         'data.kv.unique_values=False to let keys share values.')
  if config.min_operands < 2:
    fail('min_operands', 'must be >= 2 (an expression needs an operator).')
  if config.max_operands < config.min_operands:
    fail('max_operands',
         f'must be >= data.kv.min_operands={config.min_operands}.')
  ops = config.operators
  if not isinstance(ops, str) or not ops:
    fail('operators', f'must be a non-empty string of {ALLOWED_OPERATORS!r}.')
  for op in ops:
    if op not in ALLOWED_OPERATORS:
      fail('operators', f'unknown operator {op!r}; use characters of '
           f'{ALLOWED_OPERATORS!r}.')
  if len(set(ops)) != len(ops):
    fail('operators', 'contains a repeated operator; list each once.')
  frac = config.compose_key_fraction
  if not isinstance(frac, (float, int)) or not 0.0 < frac < 1.0:
    fail('compose_key_fraction', 'must be in (0, 1), e.g. 0.2.')
  if not 1 <= num_compose_keys(config) <= config.num_keys - 1:
    fail('compose_key_fraction', f'leaves {num_compose_keys(config)} of '
         f'{config.num_keys} keys for composition; need at least one compose '
         'and one held-out key. Move it towards 0.5 or raise data.kv.num_keys.')
  if config.seed < 0:
    fail('seed', 'must be >= 0.')
  for field in ('num_kv_subs_train', 'num_num_math_train',
                'num_kv_math_compose', 'num_eval'):
    if getattr(config, field) < 1:
      fail(field, 'must be >= 1.')
  if not 0 <= config.num_math_in_compose <= config.num_num_math_train:
    fail('num_math_in_compose', 'must be in [0, data.kv.num_num_math_train='
         f'{config.num_num_math_train}]: they are taken from num_math_train.')
  end = config.subs_prompt_end
  if not isinstance(end, str) or len(end) != 1 or not end.isprintable() or (
      end.isspace() or end.isdecimal() or end in ALLOWED_OPERATORS):
    fail('subs_prompt_end', "must be one printable character other than "
         f"whitespace, digits and {ALLOWED_OPERATORS!r}, e.g. ':' (or '=', "
         "the paper's format).")
  if end in alphabet:
    fail('subs_prompt_end', 'is a character of data.kv.key_alphabet, so a '
         "prompt could end inside a key; choose another, e.g. ':'.")
  if config.num_copy_in_math < 0:
    fail('num_copy_in_math', 'must be >= 0.')
  if not 0 <= config.num_copy_in_compose <= config.num_copy_in_math:
    fail('num_copy_in_compose', 'must be in [0, data.kv.num_copy_in_math='
         f'{config.num_copy_in_math}]: they are taken from its copies.')
  if config.num_defs_in_math < 0:
    fail('num_defs_in_math', 'must be >= 0.')
  if config.num_defs_in_math and ';' in alphabet + config.value_alphabet:
    fail('num_defs_in_math', "NUM-DEFS prompts end their definitions with "
         "';', a character of data.kv.key_alphabet or value_alphabet; "
         'remove it from them.')
  if config.num_kv_subs_in_compose < 0:
    fail('num_kv_subs_in_compose', 'must be >= 0.')
  if config.num_kv_subs_in_compose and end == '=':
    fail('num_kv_subs_in_compose', "KV-SUBS prompts in D_C would read as "
         "KV-MATH's (both end with '='); set data.kv.subs_prompt_end to "
         "another character, e.g. ':'.")
  if config.num_copy_in_math and end == '=':
    fail('num_copy_in_math', "NUM-COPY prompts would read as NUM-MATH's "
         "(both end with '='); set data.kv.subs_prompt_end to another "
         "character, e.g. ':'.")
  values = config.value_alphabet
  if not isinstance(values, str):
    fail('value_alphabet', "must be a string ('' for decimal numerals).")
  if values:
    if len(values) < config.max_value:
      fail('value_alphabet', f'has {len(values)} characters for values 1..'
           f'data.kv.max_value={config.max_value}; give one per value, e.g. '
           'kv_arithmetic.letters(max_value, start=0x400).')
    if len(set(values)) != len(values):
      fail('value_alphabet', 'contains a repeated character; list each once.')
    for char in values:
      if _reserved(char) or char in alphabet or char == end:
        fail('value_alphabet', f'{char!r} may not write a value; use '
             "printable characters other than digits, '=', whitespace, "
             f'{ALLOWED_OPERATORS!r}, data.kv.subs_prompt_end and the '
             'characters of data.kv.key_alphabet.')


def _named_config(name: str, description: str, **fields) -> KvArithmeticConfig:
  config = KvArithmeticConfig(name=name, description=description, **fields)
  validate_config(config)
  return config


DEFAULT_CONFIG = _named_config(
    'default', 'Paper sizes: 25K keys, values in [1, 25K].')
SMOKE_CONFIG = _named_config(
    'smoke', 'Tiny, for tests and local runs.',
    num_keys=200, max_value=1000, num_kv_subs_train=512,
    num_num_math_train=512, num_kv_math_compose=256, num_eval=64)
NAMED_CONFIGS = (DEFAULT_CONFIG, SMOKE_CONFIG)


def make_config(**fields: Any) -> KvArithmeticConfig:
  """Returns a validated config whose name is a function of all its fields.

  Equal fields give the same name (prepared data is reused), different fields
  a different directory. Fields equal to a named config return that config.
  """
  for field in fields:
    if field not in FIELDS:
      raise ValueError(f'Unknown field data.kv.{field}. Known fields: '
                       f'{list(FIELDS)}. Remove it or fix its spelling.')
  config = KvArithmeticConfig(name='unnamed', **fields)
  validate_config(config)
  values = config_fields(config)
  for named in NAMED_CONFIGS:
    if config_fields(named) == values:
      return named
  digest = hashlib.sha256(
      json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
  config.name = (
      f'k{config.num_keys}_v{config.max_value}_s{config.seed}_{digest}')
  config.description = f'Custom: {values}'
  return config


# --------------------------------------------------------------------------
# Key map.


def letters(count: int, start: int = 0xC0) -> str:
  """The first `count` letters (str.isalpha) from code point `start` on.

  `letters(500)` gives 500 single-character keys from Latin-1 and Latin
  Extended-A/B, each one token with data.tokenizer='char'.
  """
  out, c = [], start
  while len(out) < count:
    if chr(c).isalpha() and chr(c).isprintable():
      out.append(chr(c))
    c += 1
  return ''.join(out)


def make_keys(config: KvArithmeticConfig) -> list[str]:
  """Returns `num_keys` distinct keys, deterministic in the seed.

  Each candidate first draws its length uniformly, then its characters from
  `key_alphabet`; repeats are rejected. Short lengths saturate (there are only
  676 two-letter keys), after which their draws are simply rejected.
  """
  rng = np.random.default_rng([config.seed, _KEYS_STREAM])
  lo, hi = config.key_min_len, config.key_max_len
  alphabet = np.array([ord(c) for c in config.key_alphabet], np.uint32)
  keys, seen = [], set()
  while len(keys) < config.num_keys:
    # Vectorised draws in chunks; Python only dedupes and slices.
    n = 2 * (config.num_keys - len(keys)) + 64
    lengths = rng.integers(lo, hi + 1, size=n)
    # uint8 draws while the alphabet fits: the draws (and so the keys) of
    # the 26-letter default stay what they were before alphabets existed.
    dtype = np.uint8 if len(alphabet) <= 256 else np.uint32
    letters = alphabet[rng.integers(0, len(alphabet), size=(n, hi),
                                    dtype=dtype)]
    rows = letters.view(f'U{hi}').ravel()
    for row, length in zip(rows, lengths):
      key = row[:length]
      if key not in seen:
        seen.add(key)
        keys.append(key)
        if len(keys) == config.num_keys:
          break
  return keys


def make_values(config: KvArithmeticConfig) -> np.ndarray:
  """Returns int64 values in [1, max_value], one per key.

  Distinct when `config.unique_values`, else uniform with replacement.
  """
  # A stream of its own, so the values do not depend on how many key draws
  # were rejected.
  rng = np.random.default_rng([config.seed, _KEYS_STREAM, 1])
  if config.unique_values:
    values = rng.permutation(config.max_value)[:config.num_keys]
  else:
    values = rng.integers(0, config.max_value, size=config.num_keys)
  return values.astype(np.int64) + 1


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """The key -> value map and its split into compose and held-out keys."""

  keys: list[str]
  values: np.ndarray  # int64 [num_keys], values[i] belongs to keys[i].
  compose: np.ndarray  # Sorted indices of the compose keys (D_C only).
  held_out: np.ndarray  # Sorted indices of the held-out keys (evaluation).

  def as_dict(self) -> dict[str, int]:
    return {k: int(v) for k, v in zip(self.keys, self.values)}


def make_key_map(config: KvArithmeticConfig) -> KeyMap:
  """Returns the deterministic key map of `config`."""
  rng = np.random.default_rng([config.seed, _KEY_SPLIT_STREAM])
  perm = rng.permutation(config.num_keys)
  n = num_compose_keys(config)
  return KeyMap(
      keys=make_keys(config),
      values=make_values(config),
      compose=np.sort(perm[:n]),
      held_out=np.sort(perm[n:]),
  )


# --------------------------------------------------------------------------
# Expressions.


def evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
  """Exact value of `o0 op0 o1 op1 ...` with `*` binding tighter than +/-."""
  if len(operators) != len(operands) - 1:
    raise ValueError(f'{len(operands)} operands need {len(operands) - 1} '
                     f'operators, got {len(operators)}.')
  # Python ints throughout: products of 6 values overflow int64.
  total, sign, term = 0, 1, int(operands[0])
  for op, x in zip(operators, operands[1:]):
    if op == '*':
      term *= int(x)
    elif op in '+-':
      total += sign * term
      sign, term = (1 if op == '+' else -1), int(x)
    else:
      raise ValueError(f'Unknown operator {op!r}.')
  return total + sign * term


def render(operands: Sequence[Any], operators: Sequence[str]) -> str:
  """Renders `o0 op0 o1 ...` compactly: 'abc+de*fgh' or '10+22*24'."""
  parts = [str(operands[0])]
  for op, x in zip(operators, operands[1:]):
    parts += [op, str(x)]
  return ''.join(parts)


def make_example(task: str, keys: Sequence[str] | None, values: Sequence[int],
                 operators: Sequence[str], subs_prompt_end: str = '=',
                 value_alphabet: str = '',
                 definition_order: Sequence[int] | None = None
                 ) -> dict[str, str]:
  """One example of `task`; `keys` may be None for 'num_math' and
  'num_copy'. For 'num_defs', `values` are the example's own (equal keys,
  equal values) and `definition_order` orders the prompt's definitions of
  the distinct keys (default: first use). Substitutions (KV-SUBS,
  NUM-COPY) end their prompt with `subs_prompt_end`, the others with '='. A value v is written as
  `value_alphabet[v - 1]` when that is given."""
  end = '='
  shown = ([value_alphabet[int(v) - 1] for v in values] if value_alphabet
           else values)
  if task == 'kv_subs':
    prompt, target = render(keys, operators), render(shown, operators)
    end = subs_prompt_end
  elif task == 'num_copy':
    prompt = target = render(shown, operators)
    end = subs_prompt_end
  elif task == 'num_math':
    prompt, target = render(shown, operators), str(evaluate(values, operators))
  elif task == 'kv_math':
    prompt, target = render(keys, operators), str(evaluate(values, operators))
  elif task == 'num_defs':
    # Each key once, in the order of its first use; `definition_order`
    # permutes them so that no key's definition sits at a fixed place.
    value_of = dict(zip(keys, shown))
    distinct = list(value_of)
    order = definition_order if definition_order is not None else range(
        len(distinct))
    defs = ''.join(f'{distinct[i]}{value_of[distinct[i]]}' for i in order)
    prompt = defs + ';' + render(keys, operators)
    target = str(evaluate(values, operators))
  else:
    raise ValueError(f'Unknown task {task!r}.')
  return {'prompt': prompt + end, 'target': target, 'task': task}


def sample_expressions(
    rng: np.random.Generator, pool_size: int, count: int,
    config: KvArithmeticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws `count` expression skeletons over a pool of `pool_size` operands.

  Returns (lengths [count], operand indices [count, max_operands], operator
  indices into `config.operators` [count, max_operands - 1]); row i uses the
  first lengths[i] operands and lengths[i] - 1 operators. Operands are drawn
  with replacement, everything uniformly.
  """
  k = config.max_operands
  lengths = rng.integers(config.min_operands, k + 1, size=count)
  operands = rng.integers(0, pool_size, size=(count, k))
  operators = rng.integers(0, len(config.operators), size=(count, k - 1))
  return lengths, operands, operators


def _pool(key_map: KeyMap, name: str) -> np.ndarray | None:
  return {'all_keys': np.arange(len(key_map.keys)), 'compose_keys':
          key_map.compose, 'held_out_keys': key_map.held_out,
          'numbers': None}[name]


def generate_split(config: KvArithmeticConfig, split: str, *,
                   key_map: KeyMap | None = None,
                   exclude_prompts: set[str] | None = None
                   ) -> list[dict[str, str]]:
  """Returns the examples of `split`, deterministic in the config.

  Evaluation and dev splits hold distinct prompts, none of which appears in
  the splits they avoid (generated here unless `exclude_prompts` is given).
  """
  if split not in _SPLIT_SPECS:
    raise ValueError(f'Unknown split {split!r}; valid: {list(SPLITS)}.')
  task, pool_name, count_field, avoided = _SPLIT_SPECS[split]
  avoid = ' and '.join(avoided)
  count = getattr(config, count_field)
  if key_map is None:
    key_map = make_key_map(config)
  if avoid and exclude_prompts is None:
    exclude_prompts = {ex['prompt'] for a in avoided
                       for ex in generate_split(config, a, key_map=key_map)}
  pool = _pool(key_map, pool_name)
  pool_size = config.max_value if pool is None else len(pool)
  rng = np.random.default_rng([config.seed, _STREAMS[split]])
  examples = _generate(config, split, task, pool, pool_size, count,
                       count_field, rng, key_map,
                       exclude_prompts if avoid else None, avoid)
  if split == 'num_math_train' and config.num_copy_in_math:
    examples += _copies(config, key_map)
    order = np.random.default_rng([config.seed, _COPY_MIX_STREAM]
                                  ).permutation(len(examples))
    examples = [examples[i] for i in order]
  if split == 'num_math_train' and config.num_defs_in_math:
    examples += _generate(
        config, 'num_defs_in_math', 'num_defs', _pool(key_map, 'all_keys'),
        len(key_map.keys), config.num_defs_in_math, 'num_defs_in_math',
        np.random.default_rng([config.seed, _DEFS_STREAM]), key_map, None,
        '')
    order = np.random.default_rng([config.seed, _DEFS_MIX_STREAM]
                                  ).permutation(len(examples))
    examples = [examples[i] for i in order]
  if split == 'kv_math_compose' and (config.num_math_in_compose or
                                     config.num_copy_in_compose or
                                     config.num_kv_subs_in_compose):
    # The first NUM-MATH examples, as without the anchor's copies
    # (num_copy_in_math), which stay out of D_C.
    math = dataclasses.replace(config, num_copy_in_math=0, num_defs_in_math=0)
    examples += generate_split(math, 'num_math_train', key_map=key_map)[
        :config.num_math_in_compose]
    if config.num_copy_in_compose:
      examples += _copies(config, key_map)[:config.num_copy_in_compose]
    if config.num_kv_subs_in_compose:
      keys = _pool(key_map, 'compose_keys')
      examples += _generate(
          config, 'num_kv_subs_in_compose', 'kv_subs', keys, len(keys),
          config.num_kv_subs_in_compose, 'num_kv_subs_in_compose',
          np.random.default_rng([config.seed, _SUBS_IN_COMPOSE_STREAM]),
          key_map, None, '')
    order = np.random.default_rng([config.seed, _MIX_STREAM]).permutation(
        len(examples))
    examples = [examples[i] for i in order]
  return examples


def _generate(config: KvArithmeticConfig, split: str, task: str,
              pool: np.ndarray | None, pool_size: int, count: int,
              count_field: str, rng: np.random.Generator, key_map: KeyMap,
              exclude_prompts: set[str] | None, avoid: str
              ) -> list[dict[str, str]]:
  """`count` examples of `task` drawn with `rng` (see generate_split)."""

  examples, seen, drawn = [], set(), 0
  max_draws = 20 * count + 10_000
  while len(examples) < count:
    if drawn >= max_draws:
      raise ValueError(
          f'data.kv.{count_field}={count}: found only {len(examples)} '
          f'distinct {split} prompts unseen in {avoid} after {drawn} draws. '
          f'Lower data.kv.{count_field} or raise data.kv.num_keys / '
          'max_value / max_operands.')
    n = count - len(examples) + (count // 8 + 16 if avoid else 0)
    lengths, operand_idx, op_idx = sample_expressions(rng, pool_size, n, config)
    drawn += n
    for length, row, ops in zip(lengths, operand_idx, op_idx):
      row, ops = row[:length], [config.operators[o] for o in ops[:length - 1]]
      definition_order = None
      if pool is None:
        keys, values = None, (row + 1).tolist()
      elif task == 'num_defs':
        # Values of this example alone: drawn per distinct key, not read
        # off the key map.
        idx = pool[row]
        keys = [key_map.keys[i] for i in idx]
        distinct = list(dict.fromkeys(keys))
        drawn_values = dict(zip(distinct, rng.integers(
            1, config.max_value + 1, size=len(distinct)).tolist()))
        values = [drawn_values[k] for k in keys]
        definition_order = rng.permutation(len(distinct)).tolist()
      else:
        idx = pool[row]
        keys = [key_map.keys[i] for i in idx]
        values = key_map.values[idx].tolist()
      example = make_example(task, keys, values, ops,
                             config.subs_prompt_end, config.value_alphabet,
                             definition_order)
      if avoid:
        if example['prompt'] in exclude_prompts or example['prompt'] in seen:
          continue
        seen.add(example['prompt'])
      examples.append(example)
      if len(examples) == count:
        break
  return examples


def _copies(config: KvArithmeticConfig, key_map: KeyMap
            ) -> list[dict[str, str]]:
  """The `num_copy_in_math` NUM-COPY examples of the anchor's data."""
  return _generate(
      config, 'num_copy_in_math', 'num_copy', None, config.max_value,
      config.num_copy_in_math, 'num_copy_in_math',
      np.random.default_rng([config.seed, _COPY_STREAM]), key_map, None, '')


def generate_all(config: KvArithmeticConfig) -> dict[str, list[dict[str, str]]]:
  """Returns every split, generating each training split once."""
  key_map = make_key_map(config)
  out = {s: generate_split(config, s, key_map=key_map) for s in TRAIN_SPLITS}
  for split in EVAL_SPLITS + DEV_SPLITS:
    out[split] = generate_split(
        config, split, key_map=key_map,
        exclude_prompts={ex['prompt'] for a in _SPLIT_SPECS[split][3]
                         for ex in out[a]})
  return out


def max_example_chars(config: KvArithmeticConfig) -> int:
  """Upper bound on len(prompt) + len(target) over all splits.

  With the byte tokenizer an example needs this + 2 tokens (BOS, EOS), i.e.
  `data.seq_len >= max_example_chars(config) + 1`.
  """
  n, v = config.max_operands, config.max_value
  digits = 1 if config.value_alphabet else len(str(v))
  # |sum of signed products| <= v**n when v >= 2 (a + b <= a * b for a,b >= 2).
  bound = max(v**n, n * v) if '*' in config.operators else n * v
  result = len(str(bound)) + 1  # Sign.
  key_prompt = n * config.key_max_len + n  # n - 1 operators and '='.
  num_prompt = n * digits + n
  subs_target = n * digits + n - 1
  # NUM-COPY (num_math_train's copies, num_copy_eval) only where there are
  # copies to train on: other configs keep their bound.
  num_target = max(result, subs_target) if config.num_copy_in_math else result
  longest = max(key_prompt + max(subs_target, result), num_prompt + num_target)
  if config.num_defs_in_math:
    # Up to n definitions (a key and its value each), ';', the expression
    # over keys, '=' and the answer.
    longest = max(longest, n * (config.key_max_len + digits) + 1 + key_prompt
                  + result)
  return longest


# --------------------------------------------------------------------------
# TFDS builder.


class KvArithmetic(generated.GeneratedText):
  """CALM key-value arithmetic: KV-SUBS, NUM-MATH and KV-MATH splits."""

  BUILDER_CONFIGS = list(NAMED_CONFIGS)
  TEXT_FIELDS = ('prompt', 'target', 'task')
  VERSION = tfds.core.Version('1.3.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'kv_math_dev split; data.kv.unique_values.',
                   '1.2.0': 'num_copy_eval split; data.kv.subs_prompt_end '
                            'and num_copy_in_math.',
                   '1.3.0': 'num_defs_eval split; data.kv.num_defs_in_math.'}

  def generate_splits(self) -> dict[str, list[dict[str, str]]]:
    validate_config(self.builder_config)
    return generate_all(self.builder_config)


def prepare(config: KvArithmeticConfig, data_dir: str) -> KvArithmetic:
  """Returns the builder of `config`, generating the data if not on disk."""
  validate_config(config)
  return generated.prepare(KvArithmetic, config, data_dir)


# --------------------------------------------------------------------------
# The dataset interface (calm_jax/data/pipeline.py:DATASETS).


def check_data_config(data_cfg: ml_collections.ConfigDict
                      ) -> KvArithmeticConfig:
  """The validated task config of `data.kv`, checked against data.seq_len."""
  fields = generated.subconfig_fields(data_cfg, 'kv')
  config = make_config(**fields)
  seq_len = data_cfg.get('seq_len', None)
  tokenizer = data_cfg.get('tokenizer', 'byte')
  if tokenizer == 'byte' and not config.key_alphabet.isascii():
    raise ValueError(
        'data.kv.key_alphabet has non-ASCII characters, which the byte '
        "tokenizer splits into several tokens; set data.tokenizer='char' "
        '(one token per character).')
  tok = tokenizers.get_tokenizer(tokenizer)
  is_char = isinstance(tok, tokenizers.CharTokenizer)
  if is_char:
    for char in config.key_alphabet:
      if ord(char) >= tok.num_code_points:
        raise ValueError(
            f'data.kv.key_alphabet: {char!r} (U+{ord(char):04X}) is past the '
            f"{tokenizer!r} tokenizer's U+{tok.num_code_points - 1:04X}; use "
            f"letters below it, or data.tokenizer='char:N' with N > "
            f'{ord(char)}.')
  # One token per character with the byte tokenizer (ASCII keys) and the
  # char tokenizer, so the longest possible example is known up front: fail
  # now, not when a rare long example is drawn thousands of steps into
  # training.
  if seq_len is not None and (tokenizer == 'byte' or is_char):
    needed = max_example_chars(config) + 1
    if seq_len < needed:
      raise ValueError(
          f'data.seq_len={seq_len} is too short for data.kv: the longest '
          f'possible example needs {needed} positions (BOS + prompt + target '
          f'+ EOS, shifted). Raise data.seq_len to >= {needed} or lower '
          'data.kv.max_operands / key_max_len / max_value.')
  return config


def source(split: str, data_cfg: ml_collections.ConfigDict, data_dir: str,
           split_field: str = 'train.split') -> Sequence[Any]:
  """Prepares the task of `data_cfg.kv` if needed; returns a split."""
  if split not in SPLITS:
    raise ValueError(
        f"Unknown split {split_field}={split!r} for data.dataset="
        f"'kv_arithmetic'. Valid splits: {list(SPLITS)}. Set "
        f'config.{split_field} to one of them.')
  config = check_data_config(data_cfg)
  check_split(split, data_cfg, split_field)
  builder = prepare(config, data_dir)
  return builder.as_data_source(split)


def check_split(split: str, data_cfg: ml_collections.ConfigDict,
                field: str) -> None:
  """Refuses num_defs_eval where the anchor has no NUM-DEFS: its examples
  are longer than any other split's, and data.seq_len is only checked
  against them when num_defs_in_math > 0."""
  if split == 'num_defs_eval' and not generated.subconfig_fields(
      data_cfg, 'kv').get('num_defs_in_math', 0):
    raise ValueError(
        f"{field}: 'num_defs_eval' scores the anchor's NUM-DEFS, which "
        'data.kv.num_defs_in_math=0 leaves out of its data; set it > 0 or '
        'drop the split.')
