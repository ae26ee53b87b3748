"""Checkpoints: frozen model directories and the training-run manager.

Two kinds of things are written:

* A *model directory* holds one frozen LM: `model.json` (architecture and
  format) and `params/` (an Orbax PyTree checkpoint). `save_model` writes it
  under a temporary name and renames it into place, so a reader never sees a
  half-written model.
* A *training run* (`RunCheckpointer`) is an Orbax CheckpointManager over
  `{state: trainable params + optimizer state + step, data: grain iterator}`.
  Only the trainable tree is saved; frozen models are never copied. Orbax
  finalises each step atomically, so a run killed at any moment leaves the
  previous step restorable.
"""

from __future__ import annotations

import json
import os
from typing import Any
import uuid

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from calm_jax import paths
from calm_jax.models import transformer

FORMAT = 'calm_jax.decoder/v1'
MODEL_FILE = 'model.json'


# ------------------------------------------------------------ model dirs


def read_model_file(path: str, field: str, fix: str = ''
                    ) -> transformer.DecoderConfig:
  """Reads a model directory's architecture, failing clearly if absent.

  `field` names where the path came from (e.g. 'models.anchor.checkpoint');
  `fix` replaces the advice of a corrupted directory's error (a model cached
  in the workdir is deleted and pretrained again, not re-pointed).
  """
  path = os.fspath(path)
  meta = os.path.join(path, MODEL_FILE)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(
        f'{field}: no model directory at {path!r}. Point it at a directory '
        'written by calm_jax or a Hugging Face checkpoint (config.json and '
        '*.safetensors).')
  if is_hf_checkpoint(path):
    from calm_jax import hf_import  # Deferred: reads safetensors.
    return hf_import.read_config(path)[1]
  try:
    arch = json.loads(epath.Path(meta).read_text())['arch']
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
        f'{field}: {meta!r} is missing or corrupted ({e}). The directory is '
        'not a complete calm_jax model (nor a Hugging Face one: no '
        'config.json); ' + (fix or 're-export it, or point the field at a '
                            'complete one.')) from e
  return transformer.DecoderConfig.from_dict(arch, field)


def read_model_json(path: str) -> dict[str, Any]:
  """A calm_jax model directory's model.json ({} when unreadable)."""
  try:
    return json.loads((epath.Path(path) / MODEL_FILE).read_text())
  except (OSError, ValueError):
    return {}


def is_hf_checkpoint(path: str) -> bool:
  """A Hugging Face layout (config.json) rather than calm_jax's own."""
  p = epath.Path(path)
  return not (p / MODEL_FILE).exists() and (p / 'config.json').exists()



def model_exists(path: str) -> bool:
  return (epath.Path(path) / MODEL_FILE).is_file()



# Orbax saves a replicated array "replica-parallel" by default: each of the
# array's D replicas copies 1/D of it to host, through a slice compiled per
# shape and device. That pays for large arrays; for the small ones of a
# composition (bridges, their optimizer state, a tiny model's weights) the
# slicing costs more than the copy (the KV smoke pipeline on 8 CPU devices:
# 1 MiB below keeps 112 slice programs out of it, 38.6 -> 33.0 s). Arrays
# whose slices would be smaller are written by one replica, as before
# replica-parallel existed; larger ones still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's default type handlers, with the jax.Array one above."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types()
              if ty is not jax.Array]
  try:
    array = ocp.type_handlers.ArrayHandler(
        # The default handler's record of array metadata, kept as it is.
        array_metadata_store=getattr(default, '_array_metadata_store', None),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  except TypeError:  # An Orbax without the option: its default, slower.
    array = default
  return ocp.type_handlers.create_type_handler_registry(
      (jax.Array, array), *handlers)


def pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """The handler every PyTree this package writes goes through."""
  return ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())


def restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  """Restores onto `abstract`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def save_model(path: str, config: transformer.DecoderConfig, params: Any,
               **metadata: Any) -> None:
  """Writes a model directory atomically: PATH.partial, then a rename.

  Every process calls this (Orbax writes each process's shards); only
  process 0 writes the metadata and renames. `metadata` (e.g. `tokenizer`,
  the record of the tokenizer it was trained on) goes into model.json,
  beside a unique id of this save (part of the model's fingerprint).
  """
  path = epath.Path(paths.absolute(path))
  tmp = path.parent / (path.name + '.partial')
  if jax.process_index() == 0 and tmp.exists():
    tmp.rmtree()  # Left by a run killed mid-export.
  multihost_utils.sync_global_devices('calm_jax.save_model:start')
  with ocp.Checkpointer(pytree_handler()) as ckptr:
    ckptr.save(tmp / 'params', args=ocp.args.PyTreeSave(params))
  if jax.process_index() == 0:
    (tmp / MODEL_FILE).write_text(json.dumps(
        {'format': FORMAT, 'arch': config.to_dict(), 'uid': uuid.uuid4().hex,
         **metadata}, indent=2))
    if path.exists():  # Keep the old one until the new one is whole.
      old = path.parent / (path.name + '.old')
      if old.exists():
        old.rmtree()
      path.rename(old)
      tmp.rename(path)
      old.rmtree()
    else:
      tmp.rename(path)
  multihost_utils.sync_global_devices('calm_jax.save_model:done')


def load_model(path: str, field: str = 'checkpoint', shardings: Any = None,
               max_len: int | None = None, fix: str = ''
               ) -> tuple[transformer.DecoderConfig, Any]:
  """Reads a model directory (ours or Hugging Face's); errors name `field`
  and say what to do (`fix`, if given: see read_model_file).

  `max_len` caps a Hugging Face checkpoint's context (its decode caches),
  whose `max_position_embeddings` may be far longer than any use here.
  """
  config = read_model_file(path, field, fix)
  if is_hf_checkpoint(path):
    from calm_jax import hf_import  # Deferred: reads safetensors.
    if max_len is not None:
      max_len = min(max_len, config.max_len)
    model, params = hf_import.load_pretrained(path, shardings=shardings,
                                              max_len=max_len)
    return model.config, params
  params_dir = os.path.join(paths.absolute(path), 'params')
  abstract = jax.eval_shape(
      lambda: _init_params(config))
  if shardings is None:
    # Restore onto this process's first device, whatever mesh saved it.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one, abstract)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, abstract)
  except Exception as e:  # Orbax raises many types; all mean "unreadable".
    raise ValueError(
        f'{field}: the parameters in {params_dir!r} are missing or corrupted '
        f'({type(e).__name__}: {str(e)[:300]}). ' + (
            fix or f"Re-export the model, or set {field} to '' to pretrain "
            'it.')) from e
  return config, params


def _init_params(config: transformer.DecoderConfig) -> Any:
  import flax.linen as nn
  import jax.numpy as jnp
  model = transformer.Decoder(config)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return nn.meta.unbox(variables['params'])


def restore_on_one_device(path: str) -> Any:
  """A PyTree checkpoint restored whole onto this process's first device,
  whatever mesh wrote it (for tools that run on one device)."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, 'item_metadata', meta)
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return ckptr.restore(path, abstract)


def load_composition(directory: str, step: int | None = None
                     ) -> tuple[dict, dict]:
  """(params, {aug name: pairs}) of a composed run's checkpoint.

  `directory` is a run's checkpoint folder (WORKDIR/runs/ROW/seed_S/
  checkpoints); `step` defaults to the latest. The pairs are read off the
  bridge names (the run's composition.json records them too).
  """
  if not os.path.isdir(directory):
    raise ValueError(f'no composition checkpoint directory {directory!r}.')
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise ValueError(f'step {step} is not among the checkpoints of '
                     f'{directory!r}: {sorted(steps)}.')
  if step is None:
    raise ValueError(f'no composition checkpoint in {directory!r}.')
  state = restore_on_one_device(
      os.path.join(os.path.abspath(directory), str(step), 'state'))
  params = state['params']['composition']
  pairs: dict[str, list[tuple[int, int]]] = {}
  for key in params:
    name, i, j = key.rsplit('_', 2)
    pairs.setdefault(name, []).append((int(i), int(j)))
  return params, pairs


# ----------------------------------------------------------- training runs


class RunCheckpointer:
  """Saves and restores one training run's state and data position."""

  def __init__(self, directory: str, *, keep: int = 2,
               save_every: int = 500):
    self.directory = paths.absolute(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Every `save_every` steps and at preemption; not Orbax's
            # default save at the first step, which holds nothing worth
            # resuming and costs each run a write (the last step is forced).
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(max(1, save_every)),
                policies.PreemptionCheckpointingPolicy()]),
            create=True, enable_async_checkpointing=True,
            cleanup_tmp_directories=True),
        item_handlers={'state': pytree_handler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any,
           force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether it saved.

    Asynchronous: the state is copied to host memory and the data
    iterator's position recorded before this returns (so the next step may
    donate the state's buffers and advance the iterator); the files are
    written in the background while training goes on. A `force`d save (the
    last one) waits until it is on disk; so does `close`. A kill before a
    write finishes leaves only a temporary directory, removed on resume.
    """
    saved = self.manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter)),
        force=force)
    if force:
      self.manager.wait_until_finished()
    return saved

  def restore(self, abstract_state: Any, data_iter: Any,
              step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: latest) into `data_iter`; returns state."""
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(
              state=restore_args(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:
      raise ValueError(
          f'The checkpoint {self.directory}/{step} is corrupted or does not '
          f'match this config ({type(e).__name__}: {str(e)[:300]}). Nothing '
          'was changed. Delete that step directory to resume from an earlier '
          'one, or use a fresh --workdir.') from e
    logging.info('Restored step %d from %s', step, self.directory)
    return step, restored['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
