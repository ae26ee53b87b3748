r"""Entry point: run one experiment config in a workdir.

  python -m calm_jax.main --config=experiments/kv_arithmetic.py \
      --workdir=/tmp/kv [--config.train.steps=100]

Rerunning with the same workdir resumes: pretrained models are reused and
training continues from the last checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from calm_jax import distributed
from calm_jax import host_memory
from calm_jax import logs
from calm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally FILE:VARIANT.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for data, models, checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before JAX starts its CPU threads: XLA's per-step buffers stay mapped.
  host_memory.retain_freed_memory()
  logs.quiet_libraries()
  # Bad input is one FATAL line naming the field (CALM_TRACEBACK=1 shows
  # the traceback).
  logs.run_reporting_errors(distributed.initialize_from_flags)
  logging.info('JAX %s, %s', jax.__version__, distributed.process_info())
  logs.run_reporting_errors(train.train_and_evaluate,
                            logs.config_value(_CONFIG), _WORKDIR.value,
                            where=_WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=logs.parse_flags)
