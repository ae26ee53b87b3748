"""The shared base of our TFDS builders over locally generated text.

Every dataset of calm_jax is made on this machine (key-value arithmetic,
the interpreter's standard library, Django's catalogs): nothing is
downloaded. Each builder only says which text fields an example has and how
its config's splits are generated; this base writes them as array_record
files in generation order (index i of a data source is example i of the
split), which grain then reads with its own seeded shuffle.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
import contextlib
import io
import os
import shutil
import time
from typing import Any, TypeVar

from absl import logging
from etils import epath
import jax
import tensorflow_datasets as tfds

from calm_jax import locks

Example = dict[str, str]
_B = TypeVar('_B', bound='GeneratedText')


class GeneratedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder whose examples are text fields made by `generate_splits`.

  Subclasses set `TEXT_FIELDS` (every field an example carries, in order),
  `BUILDER_CONFIGS` and the docstring, and implement `generate_splits`.
  Empty splits are not written (TFDS cannot write them); a reader asking for
  one gets the error of `data_source`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  TEXT_FIELDS: tuple[str, ...] = ('prompt', 'target', 'task')

  # TFDS 4.9.10 locates a packaged builder's source through the
  # `importlib_resources` backport, which is not installed (nor needed) here;
  # the source path only serves to look up a checksums file we do not have.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  @abc.abstractmethod
  def generate_splits(self) -> Mapping[str, Sequence[Example]]:
    """Every split of `self.builder_config`, by name."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {field: tfds.features.Text() for field in self.TEXT_FIELDS}),
        # Keep generation order on disk: index i of the data source is
        # example i of the split. Training shuffles with grain anyway.
        disable_shuffling=True,
        homepage='https://arxiv.org/abs/2401.02412',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    splits = self.generate_splits()
    return {name: self._generate_examples(examples)
            for name, examples in splits.items() if examples}

  def _generate_examples(self, examples: Sequence[Example]
                         ) -> Iterator[tuple[int, Example]]:
    yield from enumerate(examples)


def subconfig_fields(data_cfg: Any, key: str) -> dict[str, Any]:
  """The fields of `data.<key>` as a plain dict ({} when it is absent)."""
  sub = data_cfg.get(key, None)
  if sub is None:
    return {}
  if hasattr(sub, 'to_dict'):  # An ml_collections.ConfigDict.
    return sub.to_dict()
  return dict(sub)


def check_seq_len_fits(data_cfg: Any, key: str, max_chars: int) -> None:
  """Refuses a byte-tokenized data.seq_len too short for examples of up to
  `max_chars` characters (data.<key>.max_chars): BOS + prompt + target +
  EOS, shifted, need max_chars + 1 positions."""
  seq_len = data_cfg.get('seq_len', None)
  if seq_len is not None and data_cfg.get('tokenizer', 'byte') == 'byte':
    needed = max_chars + 1
    if seq_len < needed:
      raise ValueError(
          f'data.seq_len={seq_len} is too short for '
          f'data.{key}.max_chars={max_chars}: an example needs up to '
          f'{needed} positions (BOS + prompt + target + EOS, shifted). Raise '
          f'data.seq_len to >= {needed} or lower data.{key}.max_chars.')


def prepare(builder_cls: type[_B], config: Any, data_dir: str) -> _B:
  """The builder of `config`, generating its data if not on disk yet.

  One process generates at a time (`locks`): a second run is refused, the
  other processes of a multi-host run wait for it and then read the data.
  """
  builder = builder_cls(config=config, data_dir=data_dir,
                        file_format='array_record')
  if builder.is_prepared():
    return builder
  parent = os.path.dirname(os.fspath(builder.data_dir))
  # The processes of one multi-host run wait for whichever generates; a
  # separate run is refused at once.
  with locks.hold(os.path.join(parent, '.lock'),
                  f'generating {builder.name} in {parent}',
                  wait_s=3600.0 if jax.process_count() > 1 else 0.0):
    if builder.is_prepared():  # Another process made it meanwhile.
      return builder_cls(config=config, data_dir=data_dir,
                         file_format='array_record')
    # What a killed run left half-written: TFDS would keep it forever.
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
      if name.startswith('incomplete.'):
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tfds.disable_progress_bar()
    start = time.perf_counter()
    # TFDS prints "Downloading and preparing" for data that is generated
    # here, not downloaded: one line of ours instead.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(file_format='array_record')
    logging.info('[data] wrote %s in %.1fs: %s', builder.name,
                 time.perf_counter() - start, ', '.join(
                     f'{k} {v.num_examples}'
                     for k, v in builder.info.splits.items()))
  return builder


def data_source(builder: GeneratedText, split: str, split_field: str,
                why_empty: str) -> Sequence[Any]:
  """The random-access source of one split, or an error naming the fix.

  `why_empty` says which data fields make the split empty and how to fill
  it; it follows "<split_field>=<split>: this config has no <split>
  examples".
  """
  if split not in builder.info.splits:
    raise ValueError(
        f'{split_field}={split!r}: this data config has no {split} examples '
        f'({why_empty})')
  return builder.as_data_source(split)
