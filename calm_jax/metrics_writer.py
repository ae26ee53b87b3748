"""TensorBoard event files for training metrics (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that does nothing, so
the loop never branches on the process index.
"""

from __future__ import annotations

from typing import Mapping

from absl import logging


class MetricsWriter:
  """Scalars and text to `logdir` as TensorBoard event files."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # Deferred: only the writing process needs it.
      try:
        self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=30)
      except Exception as e:  # E.g. a bucket tensorboardX cannot reach.
        logging.warning('No TensorBoard events in %s: %s', logdir, e)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(name, text, step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
