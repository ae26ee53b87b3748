"""Workdir paths that may be local or remote (gs://...), via etils.epath.

TPU pod jobs write their workdir to a bucket, so everything that touches the
workdir goes through `epath.Path`, which speaks both; Orbax and TFDS take
the same strings.
"""

from __future__ import annotations

import os

from etils import epath


def absolute(path: str) -> str:
  """An absolute local path, or a remote URI as it is."""
  path = os.fspath(path)
  return path if '://' in path else os.path.abspath(path)


def atomic_write_text(path: str, text: str) -> None:
  """Writes via a temporary file and a rename, so readers never see half."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)
