"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax."""


def load_pretrained(path: str, dtype: str = 'float32', shardings=None):
  """(model, params) from a Hugging Face-layout checkpoint directory.

  See `calm_jax.hf_import.load_pretrained`; imported lazily so that
  `import calm_jax` stays cheap.
  """
  from calm_jax import hf_import
  return hf_import.load_pretrained(path, dtype=dtype, shardings=shardings)
