"""The tokenizer saved next to a Hugging Face checkpoint.

`HFTokenizer` reads `tokenizer.json` (the `tokenizers` library) or, failing
that, a SentencePiece `tokenizer.model`, and offers the interface of
`calm_jax.data.tokenizers.Tokenizer`: `encode` (no special tokens; the data
pipeline adds BOS and EOS itself), `decode`, `vocab_size`, `pad_id`,
`bos_id`, `eos_id`. Neither library is needed unless one is used.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence


def _read_json(file: str) -> dict[str, Any]:
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


class HFTokenizer:
  """A checkpoint directory's tokenizer with this library's tokenizer API.

  Special tokens come from `tokenizer_config.json` (token strings), else
  from the ids in `generation_config.json` / `config.json`. A tokenizer
  without a pad token pads with EOS, as transformers' generate does; the
  data pipeline's loss weights do not depend on the pad id.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    json_file = os.path.join(path, 'tokenizer.json')
    sp_file = os.path.join(path, 'tokenizer.model')
    lookup: Callable[[str], int | None]
    if os.path.exists(json_file):
      from tokenizers import Tokenizer  # Deferred: optional dependency.
      tok = Tokenizer.from_file(json_file)
      self.name = json_file
      self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
      lookup = tok.token_to_id
      self._encode = lambda t: tok.encode(t, add_special_tokens=False).ids
      self._decode = tok.decode
      sp_ids = {}
    elif os.path.exists(sp_file):
      import sentencepiece  # Deferred: optional dependency.
      sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
      self.name = sp_file
      self.vocab_size = sp.get_piece_size()
      # piece_to_id answers unk_id for unknown pieces; only unk itself may.
      lookup = lambda piece: (sp.piece_to_id(piece) if sp.piece_to_id(piece)
                              != sp.unk_id() or piece == sp.id_to_piece(
                                  sp.unk_id()) else None)
      self._encode = sp.encode
      self._decode = sp.decode
      # SentencePiece answers -1 for an id it does not define.
      sp_ids = {k: i for k, i in (('bos', sp.bos_id()), ('eos', sp.eos_id()),
                                  ('pad', sp.pad_id())) if i >= 0}
    else:
      raise ValueError(f'{path} has neither tokenizer.json nor '
                       'tokenizer.model.')

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

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without BOS/EOS (the pipeline adds them)."""
    return list(self._encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS, PAD and BOS dropped."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if i not in (self.pad_id,
                                                     self.bos_id)])
