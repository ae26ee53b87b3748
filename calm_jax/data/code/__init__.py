"""The code corpus of `calm_jax.data.code_corpus`, by concern:

  base       splits, the corpus config and its validation, shared types
  texts      chunking text at line boundaries, packing records, samples
  functions  docstring -> body and function -> docstring pairs, doctests
  stdlib     the interpreter's standard library: files, split by file
  prose      English prose from Debian's `fortunes`
"""
