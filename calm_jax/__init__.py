"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax."""

from __future__ import annotations

import os
from typing import Any


def load_pretrained(path: str | os.PathLike, dtype: str = 'float32',
                    shardings: Any = None, max_len: int | None = None):
  """(model, params) from a Hugging Face-layout checkpoint directory.

  See `calm_jax.hf_import.load_pretrained`; imported lazily so that
  `import calm_jax` stays cheap (no JAX, Flax or safetensors).
  """
  from calm_jax import hf_import  # pylint: disable=g-import-not-at-top
  return hf_import.load_pretrained(path, dtype=dtype, shardings=shardings,
                                   max_len=max_len)
