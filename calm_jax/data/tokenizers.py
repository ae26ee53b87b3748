"""Tokenizers, chosen by name from the config field `data.tokenizer`.

The key-value arithmetic task is character level by nature (keys are letter
strings, values are numerals), so the default tokenizer is a byte tokenizer
with three reserved ids. Both CALM models read the same token ids, which keeps
the composition free of any vocabulary alignment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Protocol


class Tokenizer(Protocol):
  """What the data pipeline and decoding need from a tokenizer."""

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

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

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special

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

  @property
  def vocab_size(self) -> int:
    return self.num_code_points + self.num_special

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


_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    'byte': ByteTokenizer,
    'char': CharTokenizer,
}


def get_tokenizer(name: str) -> Tokenizer:
  """Returns the tokenizer registered under `name` (config `data.tokenizer`).

  `char:N` is the char tokenizer over the first N code points (`char` is
  `char:768`), for vocabularies of more one-token letters.
  """
  if isinstance(name, str) and name.startswith('char:'):
    count = name[len('char:'):]
    if not count.isdigit() or not 128 <= int(count) <= 0x110000:
      raise ValueError(
          f'data.tokenizer={name!r}: N in char:N is the number of code '
          f'points covered, an integer in [128, {0x110000}], e.g. char:4096.')
    return CharTokenizer(name=name, num_code_points=int(count))
  if name not in _TOKENIZERS:
    raise ValueError(
        f'Unknown tokenizer data.tokenizer={name!r}. Known tokenizers: '
        f'{sorted(_TOKENIZERS)} and char:N. Set config.data.tokenizer to one '
        'of them, or register a new one in '
        'calm_jax/data/tokenizers.py:_TOKENIZERS.'
    )
  return _TOKENIZERS[name]()
