"""Tokenizers, chosen by the config field `data.tokenizer`.

  byte        UTF-8 bytes after PAD/BOS/EOS (259 ids), the default for
              models pretrained here;
  char[:N]    one id per code point below N (default 768);
  anchor      the anchor checkpoint's own tokenizer (the default whenever
              the anchor is a checkpoint);
  PATH        a checkpoint directory (Hugging Face layout) with a
              `tokenizer.json` or a SentencePiece `tokenizer.model`.

Every model of a composition reads the same token ids, so every model must
have been trained with the same tokenizer: `fingerprint` hashes a
tokenizer's token-to-id map, and the config check compares fingerprints,
not vocabulary sizes (`config_lib.validate_models`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, ClassVar, Protocol

# What `data.tokenizer` may be besides a registered name or a path.
ANCHOR = 'anchor'
# The files a checkpoint directory's tokenizer may live in.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model')


class Tokenizer(Protocol):
  """What the data pipeline and decoding need from a tokenizer."""

  name: str
  vocab_size: int  # Ids in use: the smallest embedding table that fits.
  pad_id: int
  bos_id: int
  eos_id: int
  # True when a text has exactly one id sequence (one id per byte or per
  # character): a completion then equals a target text exactly when its
  # ids are the target's, so exact match can be read off teacher-forced
  # argmaxes (calm_jax/evaluation.py). Subword tokenizers may spell a text
  # several ways; theirs is False (the default where it is missing).
  unique_encoding: bool

  @property
  def spec(self) -> str:
    """What `data.tokenizer` names it by (a name, or an absolute path)."""

  @property
  def fingerprint(self) -> str:
    """A hash of the token-to-id map: equal iff the ids mean the same."""

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: PAD=0, BOS=1, EOS=2.

  Byte `b` maps to id `b + 3`, so the vocabulary has 256 + 3 = 259 ids and
  every string round-trips exactly.
  """

  name: str = 'byte'
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  # Number of ids reserved below the first byte id.
  num_special: int = 3
  # Every text has one id sequence (`unique_encoding` in `Tokenizer`).
  unique_encoding: ClassVar[bool] = True

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special

  @property
  def spec(self) -> str:
    return self.name

  @property
  def fingerprint(self) -> str:
    return _sha(f'calm_jax:{self.name}')

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without BOS/EOS (the pipeline adds them)."""
    return [b + self.num_special for b in text.encode('utf-8')]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, stopping at the first EOS.

    PAD and BOS are skipped rather than treated as terminators so that
    left-padded or BOS-prefixed decoder outputs decode cleanly. Invalid UTF-8
    (possible from an untrained model) becomes U+FFFD instead of raising.
    """
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id):
        continue
      b = i - self.num_special
      # Ids past the byte range can only come from a model with a larger
      # (padded) vocabulary; they carry no text.
      if 0 <= b < 256:
        out.append(b)
    return out.decode('utf-8', errors='replace')


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One id per Unicode code point below `num_code_points`, after PAD/BOS/EOS.

  Code point `c` maps to id `c + 3`, so ASCII text gets the same ids as with
  `ByteTokenizer`. The default 768 code points (U+0000..U+02FF: ASCII,
  Latin-1, Latin Extended-A/B, IPA) give 531 letters that are one token each,
  e.g. single-character keys for the key-value task. Text outside the range
  raises rather than being silently mapped to a shared id.
  """

  name: str = 'char'
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  num_special: int = 3
  num_code_points: int = 768
  # Every text has one id sequence (`unique_encoding` in `Tokenizer`).
  unique_encoding: ClassVar[bool] = True

  @property
  def vocab_size(self) -> int:
    return self.num_code_points + self.num_special

  @property
  def spec(self) -> str:
    return self.name

  @property
  def fingerprint(self) -> str:
    # 'char' and 'char:768' are one map.
    return _sha(f'calm_jax:char:{self.num_code_points}')

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without BOS/EOS (the pipeline adds them)."""
    ids = [ord(c) + self.num_special for c in text]
    for c, i in zip(text, ids):
      if i >= self.vocab_size:
        raise ValueError(
            f'The {self.name!r} tokenizer has no id for {c!r} (U+{ord(c):04X}'
            f'); it covers U+0000..U+{self.num_code_points - 1:04X}. Use '
            "data.tokenizer='byte' for arbitrary text.")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, stopping at the first EOS (like bytes)."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if self.num_special <= i < self.vocab_size:
        out.append(chr(i - self.num_special))
    return ''.join(out)


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def _read_json(file: str) -> dict[str, Any]:
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


class CheckpointTokenizer:
  """The tokenizer saved in a checkpoint directory (Hugging Face layout).

  Reads `tokenizer.json` (the `tokenizers` library) or, failing that, a
  SentencePiece `tokenizer.model`. `encode` adds no special tokens (the
  data pipeline adds BOS and EOS itself). Special tokens come from
  `tokenizer_config.json` (token strings), else from the ids in
  `generation_config.json` / `config.json`. A tokenizer without a pad token
  pads with EOS, as transformers' generate does; the loss weights do not
  depend on the pad id.
  """

  unique_encoding = False  # Subwords: a text may have several spellings.

  def __init__(self, path: str | os.PathLike):
    path = os.path.abspath(os.fspath(path))
    self.path = path
    json_file = os.path.join(path, 'tokenizer.json')
    sp_file = os.path.join(path, 'tokenizer.model')
    lookup: Callable[[str], int | None]
    if os.path.exists(json_file):
      from tokenizers import Tokenizer as HfTokenizer  # Deferred: optional.
      tok = HfTokenizer.from_file(json_file)
      self.name = json_file
      vocab = tok.get_vocab(with_added_tokens=True)
      lookup = tok.token_to_id
      self._encode = lambda t: tok.encode(t, add_special_tokens=False).ids
      self._encode_batch = lambda ts: [e.ids for e in tok.encode_batch(
          list(ts), add_special_tokens=False)]
      def offsets(text):
        e = tok.encode(text, add_special_tokens=False)
        return (e.ids, [o[0] for o in e.offsets], [o[1] for o in e.offsets],
                'chars')
      self._offsets = offsets
      self._decode = tok.decode
      sp_ids = {}
    elif os.path.exists(sp_file):
      import sentencepiece  # Deferred: optional dependency.
      sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
      self.name = sp_file
      vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
      # piece_to_id answers unk_id for unknown pieces; only unk itself may.
      lookup = lambda piece: (sp.piece_to_id(piece) if sp.piece_to_id(piece)
                              != sp.unk_id() or piece == sp.id_to_piece(
                                  sp.unk_id()) else None)
      self._encode = sp.encode
      self._encode_batch = lambda ts: sp.encode(list(ts))
      self._decode = sp.decode

      def sp_offsets(text):
        pieces = sp.encode(text, return_type='proto').pieces
        return ([p.id for p in pieces], [p.begin for p in pieces],
                [p.end for p in pieces], 'bytes')
      self._offsets = sp_offsets
      # SentencePiece answers -1 for an id it does not define.
      sp_ids = {k: i for k, i in (('bos', sp.bos_id()), ('eos', sp.eos_id()),
                                  ('pad', sp.pad_id())) if i >= 0}
    else:
      raise ValueError(f'{path} has neither tokenizer.json nor '
                       'tokenizer.model.')
    self._vocab = vocab
    # Ids may have gaps (added tokens far past the base vocabulary): a
    # model's table must reach the largest.
    self.vocab_size = max(vocab.values(), default=-1) + 1

    strings = _read_json(os.path.join(path, 'tokenizer_config.json'))
    configs = [_read_json(os.path.join(path, f))
               for f in ('generation_config.json', 'config.json')]

    def token_id(kind: str) -> int | None:
      tok = strings.get(f'{kind}_token')
      tok = tok.get('content') if isinstance(tok, dict) else tok
      found = lookup(tok) if tok else None
      if found is not None:
        return found
      for c in configs:
        i = c.get(f'{kind}_token_id')
        if isinstance(i, list):  # Several stop ids (Llama 3.1): the first.
          i = i[0] if i else None
        if i is not None:
          return int(i)
      return sp_ids.get(kind)

    eos = token_id('eos')
    if eos is None:
      raise ValueError(
          f'{path}: no EOS token found; set eos_token in '
          'tokenizer_config.json or eos_token_id in config.json.')
    self.eos_id: int = eos
    bos = token_id('bos')
    # GPT-2-style tokenizers (Qwen2 too) have one end-of-text token that
    # also starts documents.
    self.bos_id: int = eos if bos is None else bos
    pad = token_id('pad')
    self.pad_id: int = eos if pad is None else pad

  @property
  def spec(self) -> str:
    return self.path

  @functools.cached_property
  def fingerprint(self) -> str:
    return _sha(json.dumps(sorted(self._vocab.items(), key=lambda kv: kv[1]),
                           ensure_ascii=False))

  def token_to_id(self) -> dict[str, int]:
    return dict(self._vocab)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without BOS/EOS (the pipeline adds them)."""
    return list(self._encode(text))

  def offsets(self, text: str) -> tuple[list[int], list[int], list[int], str]:
    """`encode(text)` with each token's [start, end) in the text, and the
    unit of those offsets ('chars' or UTF-8 'bytes'), for
    `calm_jax.data.align`."""
    return self._offsets(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in self._encode_batch(texts)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS, PAD and BOS dropped."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if i not in (self.pad_id,
                                                     self.bos_id)])


def has_tokenizer(path: str) -> bool:
  """Whether a checkpoint directory holds a tokenizer of its own."""
  return any(os.path.exists(os.path.join(os.fspath(path), f))
             for f in TOKENIZER_FILES)


@functools.lru_cache(maxsize=16)
def _load_checkpoint_tokenizer(path: str, mtimes: tuple[float, ...]
                               ) -> CheckpointTokenizer:
  del mtimes  # Only part of the cache key: an edited file reloads.
  return CheckpointTokenizer(path)


def checkpoint_tokenizer(path: str, field: str = 'data.tokenizer'
                         ) -> CheckpointTokenizer:
  """The tokenizer of a checkpoint directory, loaded once per process."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f'{field}={path!r} is neither a known tokenizer name '
                     f"({sorted(_TOKENIZERS)}, 'char:N', {ANCHOR!r}) nor a "
                     'directory; point it at a checkpoint directory with '
                     'tokenizer.json or tokenizer.model.')
  if not has_tokenizer(path):
    raise ValueError(f'{field}: {path!r} has neither tokenizer.json nor '
                     'tokenizer.model; point it at the directory that holds '
                     "the models' tokenizer.")
  mtimes = tuple(os.path.getmtime(os.path.join(path, f)) if os.path.exists(
      os.path.join(path, f)) else 0.0 for f in TOKENIZER_FILES + (
          'tokenizer_config.json', 'config.json', 'generation_config.json'))
  try:
    return _load_checkpoint_tokenizer(path, mtimes)
  except ValueError as e:
    raise ValueError(f'{field}: {e}') from e


_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    'byte': ByteTokenizer,
    'char': CharTokenizer,
}


def _recorded_spec(path: str) -> str | None:
  """The tokenizer a calm_jax model directory records in its model.json
  (it has no tokenizer.json of its own), or None."""
  if has_tokenizer(path):
    return None
  try:
    with open(os.path.join(path, 'model.json')) as f:
      record = json.load(f).get('tokenizer') or {}
  except (OSError, ValueError, AttributeError):
    return None
  spec = record.get('spec') if isinstance(record, dict) else None
  return spec if isinstance(spec, str) and spec else None


def resolve_spec(spec: str, anchor_checkpoint: str = '') -> str:
  """`data.tokenizer` as a name or an absolute path.

  '' is `anchor` when the anchor is a checkpoint, else `byte`; `anchor`
  is the anchor checkpoint's directory, or for a calm_jax model directory
  the tokenizer its model.json records.
  """
  spec = (spec or '').strip()
  if not spec:
    spec = ANCHOR if anchor_checkpoint else 'byte'
  if spec == ANCHOR:
    if not anchor_checkpoint:
      raise ValueError(
          f"data.tokenizer={ANCHOR!r} reads the anchor checkpoint's "
          'tokenizer, but models.anchor.checkpoint is empty (the anchor is '
          "pretrained here); set data.tokenizer='byte' or a tokenizer "
          'directory, or set models.anchor.checkpoint.')
    path = os.path.abspath(anchor_checkpoint)
    recorded = _recorded_spec(path)
    return recorded if recorded is not None else path
  if spec in _TOKENIZERS or spec.startswith('char:'):
    return spec
  return os.path.abspath(spec)


def get_tokenizer(name: str, anchor_checkpoint: str = '',
                  field: str = 'data.tokenizer') -> Tokenizer:
  """The tokenizer `data.tokenizer` names (see the module docstring); errors
  name `field`, the setting the user gave it in.

  `char:N` is the char tokenizer over the first N code points (`char` is
  `char:768`), for vocabularies of more one-token letters.
  """
  if not isinstance(name, str):
    raise ValueError(f'{field}={name!r} must be a string: a name '
                     f"({sorted(_TOKENIZERS)}, 'char:N', {ANCHOR!r}) or a "
                     'tokenizer directory.')
  if name.startswith('char:'):
    count = name[len('char:'):]
    if not count.isdigit() or not 128 <= int(count) <= 0x110000:
      raise ValueError(
          f'{field}={name!r}: N in char:N is the number of code '
          f'points covered, an integer in [128, {0x110000}], e.g. char:4096.')
    return CharTokenizer(name=name, num_code_points=int(count))
  if name in _TOKENIZERS:
    return _TOKENIZERS[name]()
  spec = resolve_spec(name, anchor_checkpoint)
  if spec != name.strip() and (spec in _TOKENIZERS or
                               spec.startswith('char:')):
    return get_tokenizer(spec, field=field)  # '' without an anchor: byte.
  if not os.path.isdir(spec):
    raise ValueError(
        f'{field}={name!r}. Known tokenizers: '
        f"{sorted(_TOKENIZERS)}, 'char:N', {ANCHOR!r} (the anchor "
        "checkpoint's) or a directory with tokenizer.json or "
        'tokenizer.model.')
  return checkpoint_tokenizer(spec, field)


def record(tok: Tokenizer) -> dict[str, Any]:
  """What a model or composition file says of the tokenizer it reads."""
  return {'spec': tok.spec, 'fingerprint': tok.fingerprint,
          'vocab_size': tok.vocab_size}


def difference(a: Tokenizer, b: Tokenizer) -> str:
  """A short account of how two tokenizers' maps differ ('' if equal)."""
  if a.fingerprint == b.fingerprint:
    return ''
  maps = [t.token_to_id() if hasattr(t, 'token_to_id') else None
          for t in (a, b)]
  if None in maps:
    return f'{a.spec!r} and {b.spec!r} are different tokenizers'
  ma, mb = maps
  moved = sorted((t for t in ma if t in mb and ma[t] != mb[t]),
                 key=lambda t: ma[t])
  only = len(set(ma) ^ set(mb))
  parts = [f'{len(ma)} and {len(mb)} tokens']
  if moved:
    t = moved[0]
    parts.append(f'{len(moved)} shared tokens have other ids (e.g. {t!r}: '
                 f'{ma[t]} against {mb[t]})')
  if only:
    parts.append(f'{only} tokens are in only one of them')
  return ', '.join(parts)
