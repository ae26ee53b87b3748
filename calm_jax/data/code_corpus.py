"""The code setting of CALM (Bansal et al. 2024, Sec. 4.3) at CPU scale.

The paper augments an anchor LM with a code model m_A and evaluates code
completion, text-to-code and code-to-text. Here both corpora are local files:

  Code (m_A's domain): the Python source of the running interpreter's
    standard library (`sysconfig.get_paths()['stdlib']`), without tests,
    `site-packages`, `__pycache__` and `pydoc_data`, de-duplicated by content.
  Prose (the anchor's domain): the plain-text fortune files of the Debian
    package `fortunes` (`/usr/share/games/fortunes`), records separated by
    lines holding a single '%', kept if they are printable ASCII English.

Files are split once, by file, deterministically in `seed`: a fraction is
held out for evaluation; of the training files, some are "compose files",
the only source of the composition set D_C (`pairs_compose`). Splits:

  code_train / code_eval    LM chunks of source (prompt '', task 'code').
  prose_train / prose_eval  LM chunks of fortunes (prompt '', task 'prose').
  pairs_compose             doc2code and code2doc pairs of the compose files.
  doc2code_eval             text-to-code pairs of the held-out files.
  code2doc_eval             code-to-text pairs of the held-out files.
  doctest_eval              held-out text-to-code pairs whose function has
                            doctests (that its true body passes).
  pairs_dev                 validation for the composition: doc2code and
                            code2doc pairs of training files that are not
                            compose files (m_A saw their code).

Function pairs come from top-level functions and methods with a docstring:

  doc2code  prompt = `def` line(s) through the docstring statement (the
            source text, dedented; decorators excluded), target = the rest of
            the body, so prompt + target is the function's source.
  code2doc  prompt = the function without its docstring statement +
            '\\n# Docstring:\\n', target = the cleaned docstring.

Pairs carry `module` (the file's importable module name, '' when it cannot
be imported by its path) and `name` (the qualified function name); code
chunks carry `module` only. doc2code examples of top-level functions whose
docstring holds doctest examples ('>>>') also carry `tests` (the cleaned
docstring); a generated body is scored by running those doctests in the
sandbox (`calm_jax.sandbox.doctest_program`), which needs both `tests` and
`module`. Methods never get tests.

Every example fits `max_chars`: len(prompt) + len(target) in UTF-8 bytes is
at most `max_chars`, so with the byte tokenizer `data.seq_len >= max_chars +
1`. LM texts are chunked at line boundaries (overlong lines hard-split);
pairs that do not fit are dropped, never truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from calm_jax.data import generated
# The corpus's parts, re-exported: `code_corpus.X` is the dataset's API.
from calm_jax.data.code.base import ALL_SPLITS
from calm_jax.data.code.base import CODE2DOC_DEV_STREAM
from calm_jax.data.code.base import CODE2DOC_EVAL_STREAM
from calm_jax.data.code.base import CODE_EVAL_STREAM
from calm_jax.data.code.base import CodeCorpusConfig
from calm_jax.data.code.base import config_fields  # noqa: F401
from calm_jax.data.code.base import DEFAULT_CONFIG
from calm_jax.data.code.base import DEFAULT_PROSE_DIR  # noqa: F401
from calm_jax.data.code.base import DOC2CODE_DEV_STREAM
from calm_jax.data.code.base import DOC2CODE_EVAL_STREAM
from calm_jax.data.code.base import FIT_TO_SEQ_LEN  # noqa: F401
from calm_jax.data.code.base import HUMANEVAL
from calm_jax.data.code.base import make_config
from calm_jax.data.code.base import SPLITS
from calm_jax.data.code.base import validate_config
from calm_jax.data.code.functions import CODE2DOC_SEPARATOR  # noqa: F401
from calm_jax.data.code.functions import code2doc_example  # noqa: F401
from calm_jax.data.code.functions import doc2code_example  # noqa: F401
from calm_jax.data.code.functions import extract_functions  # noqa: F401
from calm_jax.data.code.functions import fits  # noqa: F401
from calm_jax.data.code.functions import function_pairs
from calm_jax.data.code.prose import load_prose  # noqa: F401
from calm_jax.data.code.prose import prose_chunks
from calm_jax.data.code.prose import split_prose
from calm_jax.data.code.stdlib import code_chunks
from calm_jax.data.code.stdlib import EXCLUDED_DIRS  # noqa: F401
from calm_jax.data.code.stdlib import load_files  # noqa: F401
from calm_jax.data.code.stdlib import split_files
from calm_jax.data.code.texts import chunk_text  # noqa: F401
from calm_jax.data.code.texts import pack_records  # noqa: F401
from calm_jax.data.code.texts import sample

def check_data_config(data_cfg: ml_collections.ConfigDict
                      ) -> CodeCorpusConfig:
  """The validated corpus config of `data.code`, checked against seq_len."""
  fields = generated.subconfig_fields(data_cfg, 'code')
  config = make_config(**fields)
  generated.check_seq_len_fits(data_cfg, 'code', config.max_chars)
  return config


# --------------------------------------------------------------------------
# Splits.


def generate_all(config: CodeCorpusConfig) -> dict[str, list[dict[str, str]]]:
  """Returns every split, deterministic in the config and the files."""
  validate_config(config)
  files = split_files(config)
  prose_train, prose_eval = split_prose(config)
  n = config.max_chars
  compose_d2c, compose_c2d = function_pairs(files.compose, n)
  eval_d2c, eval_c2d = function_pairs(files.eval, n)
  pairs_compose = compose_d2c + compose_c2d  # doc2code first, then code2doc.
  compose_paths = {f.path for f in files.compose}
  train_d2c, train_c2d = function_pairs(
      [f for f in files.train if f.path not in compose_paths], n)
  half = config.num_pairs_eval // 2
  return {
      'code_train': code_chunks(files.train, n),
      'prose_train': prose_chunks(prose_train, n),
      'pairs_compose': pairs_compose,
      'code_eval': sample(code_chunks(files.eval, n), config.num_code_eval,
                           config.seed, CODE_EVAL_STREAM),
      'prose_eval': prose_chunks(prose_eval, n),
      'doc2code_eval': sample(eval_d2c, config.num_pairs_eval, config.seed,
                               DOC2CODE_EVAL_STREAM),
      'code2doc_eval': sample(eval_c2d, config.num_pairs_eval, config.seed,
                               CODE2DOC_EVAL_STREAM),
      # Every held-out text-to-code example with doctests (for the pass
      # rate), uncapped: there are few.
      'doctest_eval': _passing_doctests(
          [ex for ex in eval_d2c if ex['tests'] and ex['module']],
          config.check_doctests),
      # Validation for the composition: pairs of m_A's training files other
      # than the compose files, so no row trains on them as pairs. m_A knows their code, so this loss
      # flatters m_A-based rows; it serves to see when the bridge starts
      # memorising D_C, not as a result.
      'pairs_dev': (
          sample(train_d2c, half, config.seed, DOC2CODE_DEV_STREAM)
          + sample(train_c2d, config.num_pairs_eval - half, config.seed,
                    CODE2DOC_DEV_STREAM)),
  }


def _passing_doctests(examples: list[dict[str, str]], check: bool
                      ) -> list[dict[str, str]]:
  """The examples whose reference body passes its doctests (if `check`)."""
  if not check or not examples:
    return examples
  from calm_jax import sandbox  # Deferred: only needed to build this split.
  programs = [sandbox.doctest_program(ex['module'], ex['name'],
                                      ex['prompt'] + ex['target'], ex['tests'])
              for ex in examples]
  # The standard library's own bodies: trusted code, so a plain subprocess
  # serves where bubblewrap is missing.
  return [ex for ex, ok in zip(examples, sandbox.pass_rate(
      programs, unsafe=not sandbox.available())) if ok]


# --------------------------------------------------------------------------
# TFDS builder.


class CodeCorpus(generated.GeneratedText):
  """CALM code setting: stdlib code, fortunes prose, function pairs."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'The `pairs_dev` split (composition validation).'}
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  TEXT_FIELDS = ('prompt', 'target', 'task', 'tests', 'module', 'name')

  def generate_splits(self) -> dict[str, list[dict[str, str]]]:
    return generate_all(self.builder_config)


def prepare(config: CodeCorpusConfig, data_dir: str) -> CodeCorpus:
  """Returns the builder of `config`, generating the data if not on disk."""
  validate_config(config)
  return generated.prepare(CodeCorpus, config, data_dir)


def source(split: str, data_cfg: ml_collections.ConfigDict, data_dir: str,
           split_field: str = 'train.split') -> Sequence[Any]:
  """Prepares the corpus of `data_cfg.code` if needed; returns a split."""
  if split == HUMANEVAL:
    from calm_jax.data import humaneval  # pylint: disable=g-import-not-at-top
    return list(humaneval.examples())
  if split not in SPLITS:
    raise ValueError(
        f"Unknown split {split_field}={split!r} for data.dataset="
        f"'code_corpus'. Valid splits: {list(ALL_SPLITS)}. Set "
        f'config.{split_field} to one of them.')
  builder = prepare(check_data_config(data_cfg), data_dir)
  return generated.data_source(
      builder, split, split_field,
      'too few files or too small a data.code.max_chars; doctest_eval needs '
      'held-out functions with doctests that pass. Raise data.code.max_files '
      '(0 = all) or data.code.max_chars, or drop the split.')
