"""Training and evaluation, top to bottom.

`train_and_evaluate(config, workdir)` is the whole experiment:
  1. validate the config (`validate`: each section's own check, before any
     compute),
  2. build the data,
  3. load each frozen model, or pretrain it once and cache it in the workdir,
  4. train every row of the table (only the trainable tree reaches the
     optimizer and the checkpoint; the frozen trees are never written),
  5. evaluate every row (each model alone, then CALM) and write
     `results.json`.

`run_training` is the one training loop; pretraining a plain LM and training
a composition are the same loop over a different `tasks.Task`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from calm_jax import aug_cache
from calm_jax import checkpoints
from calm_jax import compositions
from calm_jax import config_lib
from calm_jax import data as data_lib
from calm_jax import evaluation
from calm_jax import locks
from calm_jax import metrics_writer
from calm_jax import paths
from calm_jax import profiling
from calm_jax import provenance
from calm_jax import rows as rows_lib
from calm_jax import sharding
from calm_jax import tasks
from calm_jax.data import bpe
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

ConfigDict = ml_collections.ConfigDict
Params = Any
Task = tasks.Task


# ============================================================= validation


def validate(config: ConfigDict, devices: Sequence[Any] | None = None
             ) -> ConfigDict:
  """Checks a whole experiment config before any compute; returns it
  resolved (`config_lib.resolve`).

  Each section has its own check, called here in turn; `devices` (default:
  all) are what the mesh and batch sizes are checked against.
  """
  config = config_lib.resolve(config)
  mesh = config_lib.make_mesh(config, devices)
  check_batch = lambda n, field: sharding.check_batch_size(n, mesh, field)
  config_lib.check_model_dirs(config)  # Before the data: the tokenizer.
  data_lib.validate_config(config.data)
  known_split = config_lib.split_check(
      data_lib.split_names(config.data.dataset), config.data.dataset)

  def check_split(split: str, field: str) -> None:
    known_split(split, field)
    data_lib.check_split(config.data, split, field)

  config_lib.validate_models(config, check_split, check_batch)
  config_lib.validate_composition(config)
  rows_lib.validate(config)
  config_lib.validate_train(config.train, 'train', check_split,
                            config.data.seq_len, check_batch)
  evaluation.validate(config.eval, check_split, check_batch)
  config_lib.validate_baselines(config, check_split)
  return config


# ============================================================== optimizer


# What the optimizer and its schedule are made of (train_config's fields).
_OPTIMIZER_FIELDS = ('steps', 'warmup_steps', 'learning_rate', 'min_lr_ratio',
                     'b1', 'b2', 'weight_decay', 'grad_clip')


def make_optimizer(cfg: ConfigDict) -> tuple[optax.GradientTransformation,
                                             optax.Schedule]:
  """AdamW with warmup and cosine decay, one object per set of fields (so
  runs with the same optimizer share their jitted steps: `_shared_step`)."""
  return _optimizer(_optimizer_key(cfg))


def _optimizer_key(cfg: ConfigDict) -> tuple[Any, ...]:
  return tuple(cfg[k] for k in _OPTIMIZER_FIELDS)


@functools.lru_cache(maxsize=64)
def _optimizer(fields: tuple[Any, ...]) -> tuple[
    optax.GradientTransformation, optax.Schedule]:
  cfg = ConfigDict(dict(zip(_OPTIMIZER_FIELDS, fields)))
  warmup = cfg.warmup_steps or max(1, int(0.05 * cfg.steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup_steps=min(warmup, cfg.steps),
      decay_steps=max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)
  tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                   weight_decay=cfg.weight_decay)
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule


# ============================================================ update step


def make_train_step(task: Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
  """The jitted update. Only `state['params']` (the trainable tree) is
  differentiated; the frozen tree is an input like the batch."""

  def loss_fn(trainable, frozen, batch):
    return task.loss_fn({**frozen, **trainable}, batch)

  def train_step(state, frozen, batch):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], frozen, batch)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates),
                 'opt': opt, 'step': state['step'] + 1}
    # `loss` stays the cross-entropy, comparable with the eval loss and
    # with runs without extra terms, which are logged beside it.
    metrics = {'loss': aux['xent'], 'grad_norm': optax.global_norm(grads),
               'learning_rate': schedule(state['step']),
               **{k: v for k, v in aux.items() if k != 'xent'}}
    return new_state, metrics

  return train_step


@functools.lru_cache(maxsize=32)
def _shared_step(model: nn.Module, composed: bool,
                 optimizer: tuple[Any, ...]) -> Callable[..., Any]:
  """`make_train_step` of a plain (`composed` False) or composed LM trained
  on its cross-entropy: one function per model and optimizer, so that the
  rows and seeds of one structure (calm, calm_vanilla_aug and
  calm_random_aug; every seed of a row) share one trace, jit's caches
  being keyed by function. It holds no parameters."""
  task = Task(name='', model=model, frozen={}, composed=composed,
              apply=tasks.model_apply(model, composed), init_trainable=None)
  return make_train_step(task, *_optimizer(optimizer))


def make_eval_step(task: Task):
  """(all params, batch) -> summed loss, correct tokens and weight, and
  where the argmax is the target (`hits`); the table scores a trained row
  with the same program (`tasks.nll_program`)."""
  if task.composed is None:
    program = jax.jit(lambda p, b: tasks.nll_and_hits(task.apply(p, b), b))
  else:
    program = tasks.nll_program(task.model, task.composed)

  def eval_step(params, batch):
    nll, correct, weight, hits = program(params, batch)
    return {'loss_sum': nll, 'correct_sum': correct, 'weight': weight,
            'hits': hits}
  return eval_step


# =========================================================== training loop


def run_training(task: Task, cfg: ConfigDict, *, run_dir: str, **kwargs
                 ) -> tuple[Params, list[dict[str, float]]]:
  """Trains `task` for `cfg.steps`, resuming from `run_dir` if it can.

  One process at a time trains in a run directory (`locks`); the arguments
  are `_run_training`'s.
  """
  with locks.hold(os.path.join(run_dir, '.lock'), f'run directory {run_dir}',
                  enabled=jax.process_index() == 0):
    return _run_training(task, cfg, run_dir=run_dir, **kwargs)


def _run_training(task: Task, cfg: ConfigDict, *, run_dir: str,
                 data: data_lib.TrainData, mesh: jax.sharding.Mesh,
                 rules: Any, seed: int,
                 eval_batches: list[dict[str, np.ndarray]] | None = None,
                 stop_after: int | None = None,
                 exact_match: Callable[..., list[bool] | None] | None = None,
                 ) -> tuple[Params, list[dict[str, float]]]:
  """Trains `task` for `cfg.steps`, resuming from `run_dir` if it can.

  `stop_after` ends this invocation early (after checkpointing), as a
  preemption would; the schedule still spans `cfg.steps`. `exact_match`
  (hits, batch) -> matches (`evaluation.exact_matches`) adds the exact
  match of greedy completions to the evals of `eval_batches`.

  Returns the trained (unboxed, sharded) trainable params and the logged
  metrics, one dict per log line.
  """
  is_main = jax.process_index() == 0
  writer = metrics_writer.MetricsWriter(os.path.join(run_dir, 'tensorboard'),
                                        enabled=is_main)
  tx, schedule = make_optimizer(cfg)

  # ---- shapes first, then shardings, then a jitted init placed on them.
  rng = jax.random.key(seed)
  boxed = jax.eval_shape(task.init_trainable, rng)
  param_sh = sharding.param_shardings(boxed, mesh, rules)
  # Unboxing the shapes traces no model (an init trace costs ~0.2 s).
  abstract_params = jax.eval_shape(nn.meta.unbox, boxed)
  opt_sh = sharding.opt_state_shardings(tx, abstract_params, param_sh, mesh)
  rep = sharding.replicated(mesh)
  state_sh = {'params': param_sh, 'opt': opt_sh, 'step': rep}
  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, task.frozen)
  batch_sh = sharding.batch_sharding(mesh)

  def init_state(r):
    params = nn.meta.unbox(task.init_trainable(r))
    return {'params': params, 'opt': tx.init(params),
            'step': jnp.zeros((), jnp.int32)}

  # ---- data and (maybe) resume.
  data_iter = data.iterator(cfg.batch_size, seed=seed)
  ckpt = checkpoints.RunCheckpointer(
      os.path.join(run_dir, 'checkpoints'), keep=cfg.keep_checkpoints,
      save_every=cfg.checkpoint_every)
  if ckpt.latest_step() is not None:
    abstract = jax.eval_shape(init_state, rng)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, state_sh)
    start, state = ckpt.restore(abstract, data_iter)
    logging.info('[%s] resuming at step %d/%d', task.name, start, cfg.steps)
  else:
    start = 0
    state = jax.jit(init_state, out_shardings=state_sh)(rng)

  n_trainable = transformer.count_params(state['params'])
  n_frozen = transformer.count_params(task.frozen)
  logging.info('[%s] trainable params %s, frozen params %s, %d steps, '
               'batch %d x %d tokens', task.name, f'{n_trainable:,}',
               f'{n_frozen:,}', cfg.steps, cfg.batch_size, data.seq_len)
  writer.write_text(0, 'params', f'trainable={n_trainable} frozen={n_frozen}')

  if task.composed is not None and task.loss is None:
    step_fn = _shared_step(task.model, task.composed, _optimizer_key(cfg))
  else:
    step_fn = make_train_step(task, tx, schedule)
  train_step = jax.jit(
      step_fn,
      in_shardings=(state_sh, frozen_sh, batch_sh),
      out_shardings=(state_sh, rep), donate_argnums=(0,))
  eval_step = make_eval_step(task)

  # ---- the loop.
  def run_eval(done: int) -> None:
    ev = evaluate_loss(eval_step, {**task.frozen, **state['params']},
                       eval_batches, mesh, exact_match)
    logging.info('[%s] eval step %d | loss %.4f | token acc %.3f%s',
                 task.name, done, ev['loss'], ev['accuracy'],
                 f" | exact match {ev['exact_match']:.1f}%"
                 if 'exact_match' in ev else '')
    writer.write_scalars(done, {f'eval/{k}': v for k, v in ev.items()})

  if eval_batches and start == 0 and cfg.eval_every:
    run_eval(0)  # Where training starts (a composition: m_B's own loss).
  pending, t_last, history = [], time.perf_counter(), []
  # The logged curve across resumptions, written at every log line (a kill
  # loses nothing logged): the lines up to the resumed step, then ours.
  history_path = epath.Path(run_dir) / 'history.json'
  earlier = ([h for h in json.loads(history_path.read_text())
              if h['step'] <= start]
             if is_main and history_path.exists() else [])
  tokens_per_step = cfg.batch_size * data.seq_len
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  profile = _Profile(cfg.get('profile_steps', 0), start, end,
                     os.path.join(run_dir, 'profile'), task.name, is_main)
  for step in range(start, end):
    batch = sharding.global_batch(data_lib.model_inputs(next(data_iter)),
                                  mesh)
    with jax.set_mesh(mesh):  # Activation constraints name its axes.
      profile.before(step, state, lambda: train_step.lower(
          state, task.frozen, batch).compile().as_text())
      state, metrics = train_step(state, task.frozen, batch)
    pending.append(metrics)
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      pending = jax.device_get(pending)  # One sync per log line.
      now = time.perf_counter()
      step_s = (now - t_last) / len(pending)
      t_last = now
      summary = {k: float(np.mean([m[k] for m in pending]))
                 for k in pending[0]}
      summary.update(step_s=step_s, tokens_per_s=tokens_per_step / step_s)
      eta = step_s * (cfg.steps - done)
      logging.info('[%s] step %d/%d | loss %.4f | acc %.3f | %.0f tok/s | '
                   '%.3f s/step | eta %s', task.name, done, cfg.steps,
                   summary['loss'], summary['accuracy'],
                   summary['tokens_per_s'], step_s, _fmt_time(eta))
      writer.write_scalars(done, {f'train/{k}': v for k, v in summary.items()})
      history.append({'step': done, **summary})
      if is_main:
        paths.atomic_write_text(os.fspath(history_path),
                                json.dumps(earlier + history))
      pending = []
    if eval_batches and (done == cfg.steps or (
        cfg.eval_every and done % cfg.eval_every == 0)):
      run_eval(done)
    ckpt.save(done, state, data_iter, force=done == end)
  profile.before(end, state, None)
  ckpt.close()
  writer.close()
  if is_main and not history:  # Resumed at the end: nothing newer.
    paths.atomic_write_text(os.fspath(history_path), json.dumps(earlier))
  return state['params'], history


class _Profile:
  """`train.profile_steps` steps traced with jax.profiler into `directory`,
  after profiling.PROFILE_AFTER warm-up steps, with the compiled step's HLO
  and the step count beside the trace (`python -m calm_jax.profiling`)."""

  def __init__(self, steps: int, start: int, end: int, directory: str,
               name: str, is_main: bool):
    self.first = start + profiling.PROFILE_AFTER if steps > 0 else None
    self.last = None if self.first is None else min(self.first + steps, end)
    if self.first is not None and self.first >= end:
      logging.warning('[%s] train.profile_steps=%d: the run ends at step %d, '
                      'before step %d where tracing would start; nothing '
                      'is traced.', name, steps, end, self.first)
      self.first = self.last = None
    self.directory, self.name, self.is_main = directory, name, is_main

  def before(self, step: int, state: Any, hlo: Callable[[], str] | None
             ) -> None:
    """Starts or stops the trace before `step` runs (`end`: after all)."""
    if step == self.first and hlo is not None:
      jax.block_until_ready(state)  # Earlier steps stay out of the trace.
      if self.is_main:
        epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
        paths.atomic_write_text(
            os.path.join(self.directory, profiling.HLO_FILE), hlo())
        paths.atomic_write_text(os.path.join(self.directory, 'steps'),
                                f'{self.last - self.first}\n')
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
    elif step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      logging.info('[%s] traced steps %d-%d into %s (summary: python -m '
                   'calm_jax.profiling --trace_dir=%s)', self.name,
                   self.first + 1, self.last, self.directory, self.directory)
      self.first = self.last = None


def evaluate_loss(eval_step, params: Params, batches, mesh,
                  exact_match: Callable[..., list[bool] | None] | None = None
                  ) -> dict[str, float]:
  """Teacher-forced loss and token accuracy over `batches`, and with
  `exact_match` (hits, batch) -> matches, the % of examples whose greedy
  completion is the target (where every batch gives its matches)."""
  totals = {'loss_sum': 0.0, 'correct_sum': 0.0, 'weight': 0.0}
  matches = [] if exact_match else None
  for b in batches:
    out = eval_step(params, sharding.global_batch(
        data_lib.model_inputs(b), mesh, whole=True))
    hits = out.pop('hits')
    out = jax.device_get(out)
    for k in totals:
      totals[k] += float(out[k])
    if matches is not None:
      found = exact_match(np.asarray(multihost_utils.process_allgather(
          hits, tiled=True)), b)
      matches = None if found is None else matches + found
  w = max(totals['weight'], 1.0)
  result = {'loss': totals['loss_sum'] / w,
            'accuracy': totals['correct_sum'] / w}
  if matches:
    result['exact_match'] = 100.0 * sum(matches) / len(matches)
  return result


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 \
      else f'{seconds // 60}m{seconds % 60:02d}s'


# ================================================================ models


def model_path(role: str, model_cfg: ConfigDict, workdir: str) -> str:
  """Where a frozen model is read from: its checkpoint, or its cache."""
  return model_cfg.checkpoint or os.path.join(workdir, 'models', role)


def _pretrain(role: str, field: str, model_cfg: ConfigDict, path: str, *,
              workdir: str, data: data_lib.Data, mesh, rules, seed: int,
              remat: bool, attention: str = 'auto') -> None:
  """Pretrains a frozen model and saves it to `path`, with the settings
  that made it (`check_workdir` compares them with a later config's)."""
  arch = config_lib.decoder_config(model_cfg, field)
  task = tasks.decoder_task(f'pretrain:{role}',
                            dataclasses.replace(arch, remat=remat,
                                                attention=attention))
  params, _ = run_training(
      task, model_cfg.pretrain, run_dir=os.path.join(workdir, 'pretrain',
                                                     role),
      data=_pretrain_data(data, field, model_cfg),
      mesh=mesh, rules=rules, seed=seed)
  checkpoints.save_model(path, arch, params, role=role,
                         trained_on=model_cfg.pretrain.split,
                         steps=model_cfg.pretrain.steps,
                         pretrain=model_cfg.pretrain.to_dict(), seed=seed,
                         tokenizer=data_lib.tokenizer_record(data.tokenizer))
  logging.info('[%s] pretrained model saved to %s', role, path)


def _pretrain_data(data: data_lib.Data, field: str, model_cfg: ConfigDict
                   ) -> data_lib.TrainData:
  """What a frozen model pretrains on (`field`: its config's path)."""
  return data.train(model_cfg.pretrain.split, f'{field}.pretrain.split',
                    model_cfg.pretrain.seq_len, f'{field}.pretrain.seq_len')


def _compose_data(data: data_lib.Data, config: ConfigDict, split: str = ''
                  ) -> data_lib.TrainData:
  """D_C, or a baseline's own `split` (full_ft's), at train.seq_len."""
  return data.train(split or config.train.split,
                    'baselines.full_ft_split' if split else 'train.split',
                    config.train.get('seq_len', 0), 'train.seq_len')


def _pretrained_here(model_cfg: ConfigDict, path: str) -> bool:
  """Whether this run must pretrain the model (no checkpoint, none cached)."""
  return not model_cfg.checkpoint and not checkpoints.model_exists(path)


def _check_training_data(config: ConfigDict, workdir: str,
                         data: data_lib.Data,
                         own_data: dict[str, data_lib.Data]) -> None:
  """Checks every split this run trains on at the length it trains with,
  before anything trains: a `seq_len` too short for the composition's data
  or for a model pretrained later fails in one line naming its field, not
  after the models before it have pretrained. (`Data.train` keeps what
  it decoded for the training that follows, and checks each split and
  length once.)"""
  models = [('anchor', 'models.anchor', config.models.anchor, data)]
  models += [(f'aug_{name}', f'models.augmenting.{name}', m,
              own_data.get(name, data))
             for name, m in config.models.augmenting.items()]
  for role, field, m, d in models:
    if _pretrained_here(m, model_path(role, m, workdir)):
      _pretrain_data(d, field, m)
  # (A launcher's first phase only pretrains: its later runs check D_C
  # before they train, and find the models it cached.)
  if any(not rows_lib.ROWS[r].frozen for r in config.rows):
    _compose_data(data, config)
  if config.baselines.get('full_ft_split', '') and 'full_ft' in config.rows:
    _compose_data(data, config, config.baselines.full_ft_split)


def frozen_model(role: str, field: str, model_cfg: ConfigDict, *,
                 workdir: str, data: data_lib.Data, mesh, rules, seed: int,
                 dtype: str = 'float32', remat: bool = False,
                 attention: str = 'auto', context_len: int | None = None
                 ) -> tuple[transformer.DecoderConfig, Params]:
  """Loads a model, pretraining it first (once, cached) if it has no path.

  `dtype` is what the frozen copy is held and computed in (bfloat16 halves
  its memory and speeds its matmuls; the composition stays float32).
  `context_len` caps a Hugging Face checkpoint's max_len (the length of its
  decode caches) to what the experiment reads and generates.
  """
  path = model_path(role, model_cfg, workdir)
  if _pretrained_here(model_cfg, path):
    with locks.hold(path + '.lock', f'pretraining {path}',
                    enabled=jax.process_index() == 0):
      if not checkpoints.model_exists(path):  # Another run may have made it.
        _pretrain(role, field, model_cfg, path, workdir=workdir, data=data,
                  mesh=mesh, rules=rules, seed=seed, remat=remat,
                  attention=attention)
  # A model cached here is pretrained again once deleted; a checkpoint the
  # user named is theirs to re-export or re-point.
  fix = ('' if model_cfg.checkpoint else
         f'It was pretrained here by an earlier run: delete {path} and rerun '
         'to pretrain it again.')
  arch = checkpoints.read_model_file(path, f'{field}.checkpoint', fix)
  max_len = None
  if checkpoints.is_hf_checkpoint(path) and context_len:
    max_len = min(arch.max_len, context_len)
    arch = dataclasses.replace(arch, max_len=max_len)
  arch, params = checkpoints.load_model(
      path, f'{field}.checkpoint',
      shardings=decoder_shardings(arch, mesh, rules), max_len=max_len, fix=fix)
  arch, params = cast_frozen(arch, params, dtype)
  return dataclasses.replace(arch, remat=remat, attention=attention), params


# A frozen model held and computed in a dtype.
cast_frozen = transformer.cast


def decoder_shardings(arch: transformer.DecoderConfig, mesh, rules) -> Any:
  """Where each parameter of a plain LM lives on the mesh."""
  boxed = jax.eval_shape(tasks.decoder_task('shapes', arch).init_trainable,
                         jax.random.key(0))
  return sharding.param_shardings(boxed, mesh, rules)


# ============================================================= experiment


def _plan(config: ConfigDict) -> list[tuple[str, int]]:
  """The (row, seed) runs of the table, in order."""
  return [(name, seed) for name in config.rows
          for seed in ((config.seed,) if rows_lib.ROWS[name].frozen
                       else config.seeds)]


class _Progress:
  """One line per run of the table: run k of n, elapsed and overall ETA
  (from the mean time of the trained runs so far)."""

  def __init__(self, plan: list[tuple[str, int]]):
    self.plan, self.start, self.trained = plan, time.perf_counter(), []

  def begin(self, k: int) -> None:
    self._t = time.perf_counter()
    name, seed = self.plan[k]
    left = sum(1 for n, _ in self.plan[k:] if not rows_lib.ROWS[n].frozen)
    eta = (f' | eta {_fmt_time(left * np.mean(self.trained))}'
           if self.trained else '')
    logging.info('[table] run %d/%d: %s seed %d | elapsed %s%s', k + 1,
                 len(self.plan), name, seed,
                 _fmt_time(time.perf_counter() - self.start), eta)

  def end(self, trained: bool) -> None:
    if trained:
      self.trained.append(time.perf_counter() - self._t)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs a whole experiment in `workdir`; returns the results dict.

  One process at a time runs in a workdir: a second one is refused before
  it writes anything there, naming the holder (`locks`). The runs of
  `launch/local.py` share the workdir under the launcher's lock, each in its
  own run directories.
  """
  # ---- 1. validation, before any compute.
  workdir = paths.absolute(workdir)
  wanted = _bpe_tokenizers(config)
  if wanted:
    # Checked with bytes in their place until they are trained (below).
    validate(_with_bytes(config, wanted))
  else:
    config = validate(config)
    config_lib.check_workdir(config, workdir)
  launched = locks.launcher_run()  # Before anything is made.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with locks.hold(os.path.join(workdir, locks.WORKDIR_LOCK),
                  f'--workdir={workdir}',
                  enabled=jax.process_index() == 0 and launched is None):
    if wanted:
      config = validate(_train_tokenizers(config, wanted, workdir))
      config_lib.check_workdir(config, workdir)
    return _train_and_evaluate(config, workdir, launched)


def _bpe_tokenizers(config: ConfigDict) -> dict[str, int]:
  """{augmenting model: N} of the 'bpe:N' tokenizers to train here."""
  wanted = {}
  for name, m in config.models.augmenting.items():
    field = f'models.augmenting.{name}.tokenizer'
    n = bpe.parse(m.get('tokenizer', ''), field)
    if n is None:
      continue
    if m.checkpoint:
      raise ValueError(
          f"{field}='bpe:{n}' trains a tokenizer for a model pretrained "
          f'here, but models.augmenting.{name}.checkpoint is set (it reads '
          f"its own); set {field}=''.")
    wanted[name] = n
  return wanted


def _text(value: Any) -> str:
  """A TFDS text feature (bytes or a 0-d array) or a str, as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _with_bytes(config: ConfigDict, wanted: dict[str, int]) -> ConfigDict:
  """`config` with bytes for the tokenizers still to train (and aligned
  streams, which they will need)."""
  config = ConfigDict(config.to_dict())
  for name in wanted:
    config.models.augmenting[name].tokenizer = 'byte'
  if config.composition.get('align', 'auto') == 'auto':
    config.composition.align = 'chars'
  return config


def _train_tokenizers(config: ConfigDict, wanted: dict[str, int],
                      workdir: str) -> ConfigDict:
  """`config` with each 'bpe:N' augmenting tokenizer trained (once, on that
  model's pretraining split, in WORKDIR/tokenizers/) and named by its
  directory."""
  config = ConfigDict(config.to_dict())
  data = data_lib.Data(
      config_lib.resolve(_with_bytes(config, wanted)).data, workdir)
  for name, n in wanted.items():
    m = config.models.augmenting[name]
    directory = os.path.join(workdir, 'tokenizers', f'{name}_bpe{n}')
    if not os.path.exists(os.path.join(directory, 'tokenizer.json')):
      source = data.source(m.pretrain.split,
                           f'models.augmenting.{name}.pretrain.split')
      texts = (''.join(_text(example[k]) for k in ('prompt', 'target'))
               for _, example in data_lib.read_examples(source))
      if jax.process_index() == 0:
        bpe.train(texts, directory, n)
        logging.info('[data] %s: a byte-level BPE of %d ids trained on %s '
                     '-> %s', name, n, m.pretrain.split, directory)
      multihost_utils.sync_global_devices(f'bpe:{name}')
    m.tokenizer = directory
  return config


def _train_and_evaluate(config: ConfigDict, workdir: str,
                        launched: str | None) -> dict[str, Any]:
  """train_and_evaluate's body, under the workdir's lock."""
  mesh = config_lib.make_mesh(config)
  rules = sharding.logical_rules(config.mesh.rules)
  bridge = config_lib.bridge_config(config.composition)
  if jax.process_index() == 0:
    # A launcher's runs each record their own config beside their log; the
    # launcher writes the table's.
    prefix = (os.path.join(workdir, 'logs', f'{launched}.') if launched
              else os.path.join(workdir, ''))
    paths.atomic_write_text(prefix + 'config.json',
                            config.to_json_best_effort(indent=2))
    paths.atomic_write_text(prefix + 'run.json', json.dumps(
        provenance.run_info(), indent=2))

  # ---- 2. data (the eval sets first: a split that cannot be scored fails
  # before any model is trained).
  logging.info('[data] %s, tokenizer %s, %d tokens per row%s',
               config.data.dataset, config.data.tokenizer, config.data.seq_len,
               ', packed' if config.data.get('pack', False) else '')
  aligned = config_lib.aligned_tokenizers(config)
  if aligned:
    logging.info('[data] aligned by characters: %s', ', '.join(
        f'{n} reads {t.spec}' for n, t in aligned.items()))
  data = data_lib.Data(config.data, workdir, aligned=aligned)
  # An augmenting model with its own tokenizer pretrains (and is scored
  # alone) on its own ids.
  own_data = {name: data.with_tokenizer(tok.spec)
              for name, tok in (aligned or {}).items()
              if tok.fingerprint != data.tokenizer.fingerprint}
  metrics = dict(config.eval.get('metrics', None) or {})
  sandbox = dict(config.eval.get('sandbox', None) or {})
  splits = {s: data.eval(s, config.eval.batch_size, config.eval.num_examples,
                         metric=metrics.get(s, 'exact_match'))
            for s in config.eval.splits}
  eval_split = config.eval.during_training_split
  exact_match_decode = config.eval.get('exact_match_decode', False)
  # The training evals also report the exact match of greedy completions
  # where it costs nothing: read off their own argmaxes, as scoring does.
  dev_exact_match = bool(eval_split) and evaluation.reads_argmaxes(
      metrics.get(eval_split, 'exact_match'), data.tokenizer,
      aligned=bool(aligned), decode=exact_match_decode)

  _check_training_data(config, workdir, data, own_data)

  # ---- 3. frozen models.
  logging.info('[models] anchor %s; augmenting %s',
               config.models.anchor.checkpoint or 'pretrained here',
               ', '.join(f'{n} {m.checkpoint or "pretrained here"}'
                         for n, m in config.models.augmenting.items()))
  kw = dict(workdir=workdir, data=data, mesh=mesh, rules=rules,
            seed=config.seed, dtype=config.frozen_dtype, remat=config.remat,
            attention=config.get('attention', 'auto'),
            context_len=config.data.seq_len + config.eval.max_new_tokens)
  anchor_cfg, anchor_params = frozen_model(
      'anchor', 'models.anchor', config.models.anchor, **kw)
  frozen = {'anchor': anchor_params}
  refs = {'anchor': compositions.ModelRef(
      model_path('anchor', config.models.anchor, workdir))}
  archs = {}
  for name, m in config.models.augmenting.items():
    archs[name], frozen[f'aug_{name}'] = frozen_model(
        f'aug_{name}', f'models.augmenting.{name}', m,
        **{**kw, 'data': own_data.get(name, data)})
    refs[f'aug_{name}'] = compositions.ModelRef(
        model_path(f'aug_{name}', m, workdir))
  augmenting = tuple(dataclasses.replace(a, config=archs[a.name])
                     for a in config_lib.augmenting_models(config))

  # ---- 4. every row of the table: train (per seed), then score.
  ctx = rows_lib.Context(
      config, anchor_cfg, augmenting, frozen, bridge=bridge, seed=config.seed,
      extra_model=lambda role, field, m: frozen_model(role, field, m, **kw),
      place=lambda arch, p: jax.device_put(
          p, decoder_shardings(arch, mesh, rules)),
      refs=refs,
      model_path=lambda role, m: model_path(role, m, workdir),
      aligned=aligned,
      own_splits=lambda name: {
          s: own_data[name].eval(s, config.eval.batch_size,
                                 config.eval.num_examples,
                                 metric=metrics.get(s, 'exact_match'))
          for s in config.eval.splits} if name in own_data else {})

  def train_data(task: Task, row_name: str, split: str
                 ) -> data_lib.TrainData:
    """D_C, with m_A's states read from disk when the config says so."""
    train = _compose_data(data, config, split)
    model = task.model
    if not (config.composition.cache_augmenting and
            isinstance(model, composition_lib.ComposedLM)):
      return train
    directory = os.path.join(workdir, 'aug_cache', row_name)
    if jax.process_index() == 0:
      aug_cache.build(directory, model.augmenting, task.frozen, train.source,
                      tokenizer=data.tokenizer, seq_len=train.seq_len)
    multihost_utils.sync_global_devices(f'aug_cache:{row_name}')
    return dataclasses.replace(
        train, source=aug_cache.CachedSource(train.source, directory))

  per_seed: dict[str, list[dict[str, Any]]] = {}
  own_tokenizer: dict[str, str] = {}  # Rows scored in their own tokenizer.
  sizes = {}
  plan = _plan(config)
  progress = _Progress(plan)
  built = {}
  for k, (row_name, seed) in enumerate(plan):
    progress.begin(k)
    if row_name not in built:
      built[row_name] = rows_lib.ROWS[row_name].build(ctx)
    row = built[row_name]
    trained = None
    if row.task is not None:
      train_cfg = config.train
      if row.steps:
        train_cfg = ml_collections.ConfigDict(config.train.to_dict())
        train_cfg.steps = row.steps
      run_dir = os.path.join(workdir, 'runs', row_name, f'seed_{seed}')
      if row.refs and jax.process_index() == 0:
        # What the run trains, for generate and load_composition.
        compositions.write(run_dir, row=row_name, seed=seed,
                           model=row.task.model, refs=row.refs,
                           tokenizer=data.tokenizer,
                           frozen_dtype=config.frozen_dtype,
                           aug_tokenizers=aligned)
      trained, _ = run_training(
          row.task, train_cfg, run_dir=run_dir,
          data=train_data(row.task, row_name, row.split), mesh=mesh,
          rules=rules, seed=seed, eval_batches=data.eval(
              eval_split, config.eval.batch_size, config.eval.num_examples)
          if eval_split else None,
          exact_match=functools.partial(
              evaluation.exact_matches, row.task.model,
              tokenizer=data.tokenizer,
              max_new_tokens=config.eval.max_new_tokens)
          if dev_exact_match else None)
      sizes[row_name] = transformer.count_params(trained)
    scored = evaluation.evaluate(
        row.to_eval(trained), splits, tokenizer=data.tokenizer,
        mesh=mesh, max_new_tokens=config.eval.max_new_tokens,
        metrics=metrics, sandbox=sandbox,
        sampling=config.eval.get('sampling', None), seed=seed,
        exact_match_decode=exact_match_decode)
    own_tokenizer.update(scored.get('own_tokenizer', {}))
    for name, scores in scored['rows'].items():
      per_seed.setdefault(name, []).append(scores)
      logging.info('[%s] seed %d: %s', name, seed, ', '.join(
          f'{s} {evaluation.METRICS[metrics.get(s, "exact_match")]} '
          f'{m[evaluation.METRICS[metrics.get(s, "exact_match")]]:.3g}'
          for s, m in scores.items()))
    progress.end(row.task is not None)

  # ---- 5. the table.
  results = evaluation.aggregate(per_seed, list(config.eval.splits), metrics)
  if own_tokenizer:
    results['own_tokenizer'] = own_tokenizer
  results['trainable_params'] = sizes
  results['frozen_params'] = {k: transformer.count_params(v)
                              for k, v in frozen.items()}
  # When and under which config (rows aside) each row was scored, so that a
  # table merged from several invocations says where each row comes from.
  setup = ConfigDict(config.to_dict())
  del setup['rows'], setup['seeds']
  config_hash = hashlib.sha256(setup.to_json(sort_keys=True).encode()
                               ).hexdigest()[:12]
  stamp = time.strftime('%Y-%m-%dT%H:%M:%S%z')
  results['scored'] = {name: {'at': stamp, 'config_hash': config_hash}
                       for name in results['rows']}
  if jax.process_index() == 0:
    evaluation.write_results(results, workdir)
  print(evaluation.format_table(results), flush=True)
  return results
