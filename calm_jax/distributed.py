"""Multi-process (multi-host) start-up: a thin layer over jax.distributed.

JAX runs one process per host (TPU VM, GPU node); each sees its local
devices, and `jax.distributed.initialize` joins them into one runtime so that
jitted functions run over the global mesh. `initialize` decides whether and
how to call it, in this order:

  1. explicit arguments (the --coordinator_address / --num_processes /
     --process_id flags defined here);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID (what launch/slurm_gpu.sh exports);
  3. a SLURM job step of several tasks, or a Cloud TPU VM: JAX's own cluster
     detection fills everything in;
  4. otherwise a single process: nothing to do.

Call it first thing in main, before anything touches a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import glob
import importlib.util
import os
from typing import Any

from absl import flags
from absl import logging
import jax

COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for jax.distributed; default: '
    '$JAX_COORDINATOR_ADDRESS or cluster auto-detection.')
NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None,
    'Number of processes (hosts); default: $JAX_NUM_PROCESSES or '
    'cluster auto-detection.')
PROCESS_ID = flags.DEFINE_integer(
    'process_id', None,
    'Index of this process in [0, num_processes); default: $JAX_PROCESS_ID '
    'or cluster auto-detection.')

_ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
        'num_processes': 'JAX_NUM_PROCESSES',
        'process_id': 'JAX_PROCESS_ID'}


def _on_tpu_vm() -> bool:
  """True on a Cloud TPU VM (libtpu installed and TPU chips attached)."""
  return (importlib.util.find_spec('libtpu') is not None and
          bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')))


def plan(coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         local_device_ids: Sequence[int] | None = None,
         env: Mapping[str, str] | None = None,
         on_tpu_vm: bool | None = None) -> tuple[str, dict[str, Any] | None]:
  """How to start: (reason, kwargs for jax.distributed.initialize or None).

  Pure, so that the resolution order is testable without starting anything.
  """
  env = os.environ if env is None else env
  args = {'coordinator_address': coordinator_address,
          'num_processes': num_processes, 'process_id': process_id}
  source = {}
  for name, var in _ENV.items():
    if args[name] is None and env.get(var):
      args[name] = env[var]
      source[name] = var
    else:
      source[name] = f'--{name}'
  for name in ('num_processes', 'process_id'):
    if args[name] is not None:
      try:
        args[name] = int(args[name])
      except ValueError:
        raise ValueError(f'{source[name]}={args[name]!r} must be an '
                         'integer.') from None

  given = [n for n, v in args.items() if v is not None]
  if len(given) == 3:
    if args['num_processes'] < 1 or not (
        0 <= args['process_id'] < args['num_processes']):
      raise ValueError(
          f'{source["process_id"]}={args["process_id"]} must be in [0, '
          f'{source["num_processes"]}={args["num_processes"]}).')
    if args['num_processes'] == 1:
      return 'single process (num_processes=1)', None
    # Everything is known: skip auto-detection, which under SLURM would also
    # pin each process to one GPU (local_device_ids=[SLURM_LOCALID]) and so
    # break our one-process-per-node launch.
    return 'explicit', dict(args, local_device_ids=local_device_ids,
                            cluster_detection_method='deactivate')

  # Only inside an srun step: the batch script itself is a single process.
  in_slurm_step = 'SLURM_STEP_ID' in env or 'SLURM_STEPID' in env
  if in_slurm_step and int(env.get('SLURM_NTASKS', '1')) > 1:
    # JAX's SLURM convention is one task per GPU (it sets local_device_ids to
    # [SLURM_LOCALID]); launch/slurm_gpu.sh runs one per node and so exports
    # JAX_* to take the explicit path above instead.
    return 'SLURM', dict(args, local_device_ids=local_device_ids)
  if on_tpu_vm is None:
    on_tpu_vm = _on_tpu_vm()
  if on_tpu_vm:
    # JAX reads the pod's topology from the TPU metadata server; on a single
    # host this yields one process, which is harmless.
    return 'Cloud TPU', dict(args, local_device_ids=local_device_ids)
  if given:
    missing = [f'--{n} (or ${_ENV[n]})' for n in _ENV if args[n] is None]
    raise ValueError(
        f'Multi-process setup is incomplete: set {", ".join(missing)} as '
        f'well, since {", ".join(source[n] for n in given)} is set and no '
        'SLURM or TPU cluster was detected to fill in the rest.')
  return 'single process', None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> None:
  """Joins the processes of a multi-host job; a no-op for a single process.

  See the module docstring for where the settings come from. Idempotent.
  """
  if jax.distributed.is_initialized():
    return
  reason, kwargs = plan(coordinator_address, num_processes, process_id,
                        local_device_ids)
  if kwargs is None:
    logging.info('jax.distributed not initialized: %s.', reason)
    return
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  logging.info('jax.distributed.initialize (%s): %s', reason, kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info('Joined: %s', process_info())


def initialize_from_flags() -> None:
  """`initialize` with the flags defined in this module (after parsing)."""
  initialize(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)


def process_info() -> str:
  """One line for logs: this process, the job's size and the backend."""
  return (f'process {jax.process_index()}/{jax.process_count()}, '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'devices ({jax.default_backend()}: {jax.devices()[0].device_kind})')
