"""Readable logs: the libraries' routine lines hidden at the default
verbosity (`--verbosity=1` shows everything).

Orbax logs every file it writes, TFDS warns about custom configs and grain,
etils and JAX's backend probe (libtpu on a CPU machine) add lines of their
own; none of them says anything about the experiment.
"""

import logging as logging_std

from absl import flags
from absl import logging

_NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/etils/',
          '/jax/_src/xla_bridge.py')


class _LibraryFilter(logging_std.Filter):
  """Drops library records below ERROR unless --verbosity >= 1."""

  def filter(self, record):
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
      return True
    noisy = any(n in record.pathname for n in _NOISY)
    return not noisy or record.levelno >= logging_std.ERROR


def quiet_libraries() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
    handler.addFilter(_LibraryFilter())
