"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax.

The public API, for notebooks and scripts (see `calm_jax.api`):

  compose(anchor, {name: (model, pairs)})  a new composition: (model, params)
  load_composition(run_dir)                a trained one: (model, params)
  load_tokenizer(path)                     the tokenizer they read
  load_pretrained(path)                    one checkpoint: (model, params)

Each is imported lazily, so that `import calm_jax` stays cheap (no JAX,
Flax or TFDS until one is called).
"""

from __future__ import annotations

import os
from typing import Any


def compose(*args, **kwargs):
  """See `calm_jax.api.compose`."""
  from calm_jax import api  # pylint: disable=g-import-not-at-top
  return api.compose(*args, **kwargs)


def load_composition(*args, **kwargs):
  """See `calm_jax.api.load_composition`."""
  from calm_jax import api  # pylint: disable=g-import-not-at-top
  return api.load_composition(*args, **kwargs)


def load_tokenizer(path: str):
  """See `calm_jax.api.load_tokenizer`."""
  from calm_jax import api  # pylint: disable=g-import-not-at-top
  return api.load_tokenizer(path)


def load_pretrained(path: str | os.PathLike, dtype: str = 'float32',
                    shardings: Any = None, max_len: int | None = None):
  """(model, params) from a Hugging Face-layout checkpoint directory.

  See `calm_jax.hf_import.load_pretrained`.
  """
  from calm_jax import hf_import  # pylint: disable=g-import-not-at-top
  return hf_import.load_pretrained(path, dtype=dtype, shardings=shardings,
                                   max_len=max_len)
