"""Readable logs and errors.

The libraries' routine lines are hidden at the default verbosity
(`--verbosity=1` shows everything); a user error is one `FATAL` line.

Orbax logs every file it writes, TFDS warns about custom configs and grain,
etils and JAX's backend probe (libtpu on a CPU machine) add lines of their
own; none of them says anything about the experiment.
"""

import difflib
import errno
import importlib.util
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
# A full disk or one this user may not write: the user's to fix, one line.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _show_traceback() -> bool:
  return bool(os.environ.get(TRACEBACK_ENV)) or (
      flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1)


def _one_line(e: BaseException, where: str = '') -> str:
  """The FATAL line of `e`; `where` is the directory the command writes
  (--workdir), named when the error does not say which file it was."""
  if isinstance(e, OSError) and e.errno in _NO_SPACE:
    path = e.filename or where or 'the output directory'
    return (f'--workdir: no space left on the device of {path}: a run needs '
            'room for its data, models and checkpoints there; free some, or '
            'point --workdir elsewhere.')
  if isinstance(e, OSError) and e.errno in _NO_WRITE:
    path = e.filename or where or 'a file'
    return (f'--workdir: cannot write {path} ({e.strerror}): a run needs '
            'write access there; choose a --workdir this user may write '
            'to.')
  return _field_first(' '.join(str(e).split()))


# A config field (`train.steps`) or a flag (`--prompt`) at a message's start.
_FIELD = re.compile(r'^(--[\w.-]+|[A-Za-z_]\w*(?:\.\w+)+)(:|=| )')


def _field_first(message: str) -> str:
  """`<field>: <message>`: the field the user set, then what to do.

  Messages name their field first already ("train.steps must be ...",
  "--temperature=-1.0 must be ..."); this puts it before a colon, so that
  every FATAL line reads the same way.
  """
  match = _FIELD.match(message)
  if not match or match.group(2) == ':':
    return message
  rest = message[match.end():] if match.group(2) == ' ' else message[
      match.end(1):].lstrip('=')
  return f'{match.group(1)}: {rest}'


def fatal(e: BaseException, where: str = '') -> None:
  """Prints `FATAL <field>: <message and fix>` on stderr and exits 1."""
  sys.stderr.write(f'FATAL {_one_line(e, where)}\n')
  sys.stderr.flush()
  sys.exit(1)


def run_reporting_errors(fn, *args, where: str = '', **kwargs):
  """fn(*args, **kwargs); a user error or a full/read-only disk becomes one
  `FATAL` line (see TRACEBACK_ENV). `where`: the directory fn writes."""
  try:
    return fn(*args, **kwargs)
  except (OSError, *USER_ERRORS) as e:
    disk = isinstance(e, OSError) and e.errno in _NO_SPACE + _NO_WRITE
    if _show_traceback() or not (disk or isinstance(e, USER_ERRORS)):
      raise
    fatal(e, where)


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
    plain = re.match(r'flag (--(?!config[.=])[^:]*): ', str(e))
    if isinstance(e, flags.IllegalFlagValueError) and plain:
      # A plain flag's bad value: absl's own line names the flag (its
      # cause, above, does not).
      why = (str(cause.args[0]) if cause is not None and cause.args
             else str(e)[plain.end():])
      if 'boolean' in why:
        why += '; give true or false'
      message = f'{plain.group(1)}: {why}'
    bad = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    config = _config_of(argv)
    unknown = [(f, w) for f in bad
               for w in [_first_unknown(config, f[len('--config.'):])] if w]
    if unknown:
      flag, (path, wrong, names) = unknown[0]
      where = f'--config.{path}' if path else '--config'
      if names is None:  # `path` is a value, not a group of fields.
        value = _field(config, path.split('.'))
        message = (f'{flag}: {where} is a value of type '
                   f'{type(value).__name__}, not a group of fields; set it '
                   f'whole, e.g. {where}={value!r}.')
      else:
        near = difflib.get_close_matches(wrong, names, n=3, cutoff=0.5)
        message = (f'{flag}: there is no field {wrong!r} in {where}; did you '
                   'mean ' + ' or '.join(f'{where}.{n}' for n in near) + '?'
                   if near else
                   f'{flag}: there is no field {wrong!r} in {where}; its '
                   f'fields are {", ".join(sorted(names))}.')
    elif unparsable := _first_unparsable(config, argv):
      message = unparsable
    elif config is None and bad and (
        'Did you mean' in message or 'does not exist' in message):
      message = (f'{bad[0]}: no such field in the config (a mistyped name?);'
                 ' see the experiment file for its fields.')
    sys.stderr.write(f'FATAL {" ".join(message.split())}\n')
    sys.exit(2)


def _config_of(argv: list[str]):
  """The config `--config=FILE[:ARG]` in argv names, loaded anew (None if
  it does not load): the parse that failed left no config behind."""
  spec = next((a.split('=', 1)[1] for a in argv[1:]
               if a.startswith('--config=')), None)
  if not spec:
    return None
  path, _, arg = spec.partition(':')
  try:
    loader = importlib.util.spec_from_file_location('_calm_config', path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


# What an override of a field of each type must look like, for the message.
_EXPECTED = {bool: (flags.BooleanParser(), 'true or false'),
             int: (flags.IntegerParser(), 'an integer'),
             float: (flags.FloatParser(), 'a number')}


def _first_unparsable(config, argv: list[str]) -> str | None:
  """The error of the first `--config.FIELD=VALUE` whose VALUE does not
  parse as FIELD's type (None if all parse): absl's own message names
  neither."""
  if config is None:
    return None
  for arg in argv[1:]:
    flag, eq, value = arg.partition('=')
    if not (flag.startswith('--config.') and eq):
      continue
    *parents, leaf = flag[len('--config.'):].split('.')
    try:
      node = _field(config, parents)
      kind = node.get_type(leaf)
    except (AttributeError, KeyError, TypeError):
      continue  # Not a field: reported as such, or not ours to explain.
    if kind not in _EXPECTED:
      continue
    parser, expected = _EXPECTED[kind]
    try:
      parser.parse(value)
    except ValueError:
      return (f'{flag}={value}: the field is {kind.__name__}; give '
              f'{expected}, e.g. {flag}={node[leaf]}')
  return None


def _first_unknown(config, dotted: str):
  """(path so far, the first name that is no field, the fields there), or
  None when every name of `dotted` exists in `config`. The fields are None
  where the path so far is a value (`rows.x`: a tuple has no fields)."""
  node, seen = config, []
  if node is None:
    return None
  for name in dotted.split('.'):
    if not hasattr(node, 'keys'):
      return '.'.join(seen), name, None
    keys = list(node.keys())
    if name not in keys:
      return ('.'.join(seen), name, keys) if keys else None
    node, seen = node[name], seen + [name]
  return None


def _field(config, names: list[str]):
  """The value at the path `names` in `config` (`config` itself at [])."""
  for name in names:
    config = config[name]
  return config
