"""Subword tokenizers trained in the pipeline (`tokenizer='bpe:N'`).

An augmenting model pretrained here may read its own vocabulary instead of
the anchor's: `models.augmenting.<name>.tokenizer='bpe:N'` trains a
byte-level BPE of N ids (GPT-2's pre-tokenizer, `tokenizers`) on that
model's pretraining split, once, into `WORKDIR/tokenizers/<name>_bpe<N>/`
(Hugging Face layout: tokenizer.json + tokenizer_config.json), and the
model then reads it like any checkpoint tokenizer. The composition aligns
the two streams by characters (`composition.align`).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

PREFIX = 'bpe:'
SPECIALS = ('<pad>', '<s>', '</s>')


def parse(spec: str, field: str) -> int | None:
  """N of a 'bpe:N' spec (None for other specs); refuses a bad N."""
  if not isinstance(spec, str) or not spec.startswith(PREFIX):
    return None
  n = spec[len(PREFIX):]
  if not n.isdigit() or not 300 <= int(n) <= 1 << 20:
    raise ValueError(f"{field}={spec!r}: N in 'bpe:N' is the vocabulary "
                     'size, an integer >= 300 (256 bytes, 3 specials and '
                     "merges), e.g. 'bpe:1024'.")
  return int(n)


def train(texts: Iterable[str], directory: str, vocab_size: int) -> str:
  """Trains a byte-level BPE on `texts` into `directory` (atomically)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tmp = directory + '.tmp'
  os.makedirs(tmp, exist_ok=True)
  tok.save(os.path.join(tmp, 'tokenizer.json'))
  with open(os.path.join(tmp, 'tokenizer_config.json'), 'w') as f:
    json.dump({'pad_token': SPECIALS[0], 'bos_token': SPECIALS[1],
               'eos_token': SPECIALS[2]}, f)
  os.replace(tmp, directory)
  return directory
