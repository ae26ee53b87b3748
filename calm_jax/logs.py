"""Readable logs and errors.

The libraries' routine lines are hidden at the default verbosity
(`--verbosity=1` shows everything); a user error is one `FATAL` line.

Orbax logs every file it writes, TFDS warns about custom configs and grain,
etils and JAX's backend probe (libtpu on a CPU machine) add lines of their
own; none of them says anything about the experiment.
"""

import errno
import logging as logging_std
import os
import re
import sys

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


# ----------------------------------------------------------- user errors

# What the project raises for bad input (a config field, a flag, a file, a
# lock held by another run): reported as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
# Set (to anything) to see the traceback of a user error too.
TRACEBACK_ENV = 'CALM_TRACEBACK'


def _show_traceback() -> bool:
  return bool(os.environ.get(TRACEBACK_ENV)) or (
      flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1)


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f'no space left on the device of {e.filename or "the workdir"}: '
            'free some, or point --workdir (or data.data_dir) elsewhere.')
  if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM,
                                            errno.EROFS):
    return (f'cannot write {e.filename or "a file"} ({e.strerror}): choose '
            'a --workdir this user may write to.')
  return ' '.join(str(e).split())


def fatal(e: BaseException) -> None:
  """Prints `FATAL <message>` on stderr and exits 1."""
  sys.stderr.write(f'FATAL {_one_line(e)}\n')
  sys.stderr.flush()
  sys.exit(1)


def run_reporting_errors(fn, *args, **kwargs):
  """fn(*args, **kwargs); a user error or a full/read-only disk becomes one
  `FATAL` line (see TRACEBACK_ENV)."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    if _show_traceback():
      raise
    fatal(e)
  except OSError as e:
    if _show_traceback() or e.errno not in (
        errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    fatal(e)


def config_value(holder: flags.FlagHolder):
  """The config of `--config`, loaded (ml_collections loads the file on
  first use); a file that does not load is one FATAL line."""
  try:
    config = holder.value
    config.keys()  # A config that failed to load raises on first use.
    return config
  except Exception as e:  # pylint: disable=broad-except
    if _show_traceback():
      raise
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fatal(ValueError(f'--config: {lines[-1] if lines else e} '
                     f'({lines[0] if lines else type(e).__name__}); give '
                     'an experiment file, e.g. '
                     '--config=experiments/compose.py.'))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config override error as one line.

  ml_collections reports a mistyped field as an AttributeError deep in its
  parser; this names the flag and the nearest valid fields instead.
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # Any error while parsing is the command line's: a flag, a config file,
    # an override of a field.
    if os.environ.get(TRACEBACK_ENV):
      raise
    cause = e.__cause__ or e.__context__ if isinstance(e, flags.Error) else e
    message = str(cause.args[0] if cause is not None and cause.args
                  else cause or e)
    if 'Traceback (most recent call last)' in message:
      # ml_collections wraps an error of the config file in its traceback:
      # its last line is the error itself.
      last = [l for l in message.splitlines() if l.strip()][-1]
      message = re.sub(r'^\w+(Error|Exception): ', '', last.strip())
    bad = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    match = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', message)
    if match and bad:
      wrong = match.group(2)
      flag = next((f for f in bad if f.endswith('.' + wrong) or
                   f'.{wrong}.' in f), bad[0])
      path = flag[:flag.index('.' + wrong)] if '.' + wrong in flag else flag
      message = (f'{flag}: there is no field {wrong!r} there; did you mean '
                 f'{path}.{match.group(1)}?')
    elif "does not exist and cannot be added" in message and bad:
      message = (f'{bad[0]}: no such field in the config (a mistyped name?);'
                 ' see the experiment file for its fields.')
    sys.stderr.write(f'FATAL {" ".join(message.split())}\n')
    sys.exit(2)
