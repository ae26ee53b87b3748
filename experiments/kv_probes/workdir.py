"""What the KV probes share: what they read, their flags, and how they run.

A probe reads the task of a kv_arithmetic workdir of `calm_jax.main` and
one of its models (`load`) or composed rows (`load_composed`); with
`--config=tiny`, the smoke task and random models instead, for the tests.
The probes that train (learnability, anchor_probe) train with the library's
loop, `train.run_training`, on one device, stopping at every eval point
(`train_in_chunks`), and score teacher-forced exact match the same way
(`exact_match`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calm_jax import checkpoints
from calm_jax import compositions
from calm_jax import data as data_lib
from calm_jax import sharding
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import kv_arithmetic as kv
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

# The bridge of the tiny composition: ours with a recency bias, so that
# its heads differ in how much they read m_A at their own position.
TINY_BRIDGE = composition_lib.BridgeConfig.make('ours', 0,
                                                {'recency_bias': True})


# ================================================================ loading


def task_of(workdir: str) -> tuple[kv.KvArithmeticConfig, str]:
  """(task config, tokenizer spec) of a kv_arithmetic workdir."""
  if not workdir:
    raise app.UsageError('--workdir is required (a calm_jax.main workdir '
                         'of experiments/kv_arithmetic.py).')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise app.UsageError(f'--workdir={workdir}: no config.json; give the '
                         'workdir of a calm_jax.main run.')
  with open(path) as f:
    config = json.load(f)
  if config['data']['dataset'] != 'kv_arithmetic':
    raise app.UsageError(f'--workdir={workdir} holds a '
                         f'{config["data"]["dataset"]!r} run; this probe '
                         'needs kv_arithmetic.')
  return (kv.make_config(**config['data']['kv']),
          config['data'].get('tokenizer', 'byte'))


def load(workdir: str, role: str, tiny: bool):
  """Returns (task config, DecoderConfig, params, tokenizer) of a model.

  The model is WORKDIR/models/ROLE; the tokenizer is the run's
  `data.tokenizer`. `tiny`: a random model on the smoke task.
  """
  if tiny:
    task, tokenizer = kv.SMOKE_CONFIG, 'byte'
    arch = transformer.DecoderConfig(vocab_size=259, d_model=32, num_layers=2,
                                     num_heads=2, d_ff=64, max_len=64)
    params = nn.meta.unbox(tasks.decoder_task(role, arch).init_trainable(
        jax.random.key(0)))
    # Through a model directory, as a workdir's models are read.
    with tempfile.TemporaryDirectory() as tmp:
      checkpoints.save_model(os.path.join(tmp, role), arch, params, role=role)
      arch, params = checkpoints.load_model(os.path.join(tmp, role))
  else:
    task, tokenizer = task_of(workdir)
    arch, params = checkpoints.load_model(
        os.path.join(workdir, 'models', role), '--workdir')
  return task, arch, params, tokenizers.get_tokenizer(tokenizer)


def load_composed(workdir: str, run: str, seed: int, tiny: bool):
  """Returns (task, model, params, tokenizer) of a trained composed row.

  The row is WORKDIR/runs/RUN/seed_SEED (its last checkpoint), rebuilt from
  its composition.json (`compositions.load`) or, for runs older than that
  file, from its checkpoint over WORKDIR/models/{anchor,aug_kv}. `tiny`:
  random models and bridges (with non-zero output projections) on the
  smoke task, for the tests.
  """
  if tiny:
    task, anchor_cfg, anchor, tok = load(workdir, 'anchor', tiny)
    _, aug_cfg, aug, _ = load(workdir, 'aug_kv', tiny)
    model = composition_lib.ComposedLM(
        anchor_cfg,
        (composition_lib.Augmenting('kv', aug_cfg, ((0, -1), (1, 1))),),
        bridge=TINY_BRIDGE)
    comp = nn.meta.unbox(model.init(
        jax.random.key(1), jnp.ones((1, 8), jnp.int32))['params'][
            'composition'])
    # Non-zero output projections, so that the writes are not all zero.
    comp = jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.random.normal(jax.random.key(2), x.shape)
                      if 'out' in jax.tree_util.keystr(p) else x), comp)
    return task, model, {'anchor': anchor, 'aug_kv': aug,
                         'composition': comp}, tok
  task, _ = task_of(workdir)
  run_dir = os.path.join(workdir, 'runs', run, f'seed_{seed}')
  ckpt_dir = os.path.join(run_dir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise app.UsageError(f'--run={run} --seed={seed}: no {ckpt_dir}; name '
                         'a composed row the workdir ran.')
  if compositions.find(run_dir):
    model, params, tok, _ = compositions.load(run_dir)
  else:
    model, params, tok = _older_row(workdir, run, ckpt_dir)
  names = [a.name for a in model.augmenting]
  if names != ['kv']:
    raise app.UsageError(f'--run={run}: {run_dir} composes {names}; these '
                         'probes read one augmenting model named kv.')
  return task, model, params, tok


def _older_row(workdir: str, run: str, ckpt_dir: str):
  """(model, params, tokenizer) of a row trained before runs wrote
  composition.json: its bridges read off the checkpoint's names and shapes,
  over the workdir's models."""
  try:
    comp, by_name = checkpoints.load_composition(ckpt_dir)
  except KeyError:
    raise app.UsageError(f'--run={run}: {ckpt_dir} holds no bridges (a row '
                         'that trains no composition); name a composed '
                         'row, e.g. calm.') from None
  _, anchor_cfg, anchor, tok = load(workdir, 'anchor', False)
  params, augmenting = {'anchor': anchor, 'composition': comp}, []
  for name, pairs in sorted(by_name.items()):
    _, cfg, params[f'aug_{name}'], _ = load(workdir, f'aug_{name}', False)
    augmenting.append(composition_lib.Augmenting(name, cfg,
                                                 tuple(sorted(pairs))))
  model = composition_lib.ComposedLM(
      anchor_cfg, tuple(augmenting),
      bridge=composition_lib.bridge_config_of(comp))
  return model, params, tok


@dataclasses.dataclass(frozen=True)
class ComposedRowFlags:
  """--workdir, --run, --seed and --config of a probe of a composed row."""
  workdir: flags.FlagHolder
  run: flags.FlagHolder
  seed: flags.FlagHolder
  config: flags.FlagHolder

  def load(self):
    """load_composed() of the row these flags name."""
    return load_composed(self.workdir.value, self.run.value, self.seed.value,
                         self.config.value == 'tiny')


def define_composed_row_flags() -> ComposedRowFlags:
  """Defines the flags that name a trained composed row (load_composed)."""
  return ComposedRowFlags(
      workdir=flags.DEFINE_string('workdir', '', 'A kv_arithmetic workdir.'),
      run=flags.DEFINE_string('run', 'calm', 'A composed row of the workdir '
                              '(runs/RUN).'),
      seed=flags.DEFINE_integer('seed', 0, 'Which seed of the row.'),
      config=flags.DEFINE_enum('config', 'workdir', ['workdir', 'tiny'],
                               'tiny: random models and bridges on the smoke '
                               'task, for the tests.'))


# ======================================================== examples, batches


def kv_math_examples(task: kv.KvArithmeticConfig, split: str,
                     **kwargs) -> list[dict[str, str]]:
  """The KV-MATH examples of `split`, in order.

  D_C (`kv_math_compose`) also holds the anchor's own NUM-MATH and NUM-COPY
  examples (numerals where the keys would be) and KV-SUBS examples (another
  target) when the config mixes them in (`data.kv.num_math_in_compose`,
  ...); a probe that reads the keys of KV-MATH prompts must skip them.
  `kwargs` go to `kv.generate_split`.
  """
  return [e for e in kv.generate_split(task, split, **kwargs)
          if e['task'] == 'kv_math']


def seq_len_of(examples: Sequence[dict[str, Any]],
               tok: tokenizers.Tokenizer) -> int:
  """The shortest `seq_len` that `pipeline.encode_example` fits them all in
  (BOS, prompt, target and EOS, shifted by one)."""
  return max(len(tok.encode(e['prompt'])) + len(tok.encode(e['target']))
             for e in examples) + 1


def batch_of(examples: Sequence[dict[str, Any]], tok: tokenizers.Tokenizer,
             seq_len: int | None = None) -> dict[str, np.ndarray]:
  """All `examples` as one batch of the pipeline's eval rows
  (`pipeline.eval_batches`: `inputs` = [BOS] prompt target [EOS] pad...,
  so that prompt character c is token c + 1 when each character is one
  token, `targets`, `weights`, `prompt_len`, the texts)."""
  (batch,) = pipeline.eval_batches(
      examples, tokenizer=tok, seq_len=seq_len or seq_len_of(examples, tok),
      batch_size=len(examples))
  return batch


def single_device() -> tuple[jax.sharding.Mesh, Any]:
  """The mesh and rules of a probe: one device, whatever the host has."""
  return (sharding.make_mesh({'data': -1}, jax.devices()[:1]),
          sharding.logical_rules(()))


def on_mesh(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
            *extra: str) -> dict[str, jax.Array]:
  """The model inputs of a host batch (and its `extra` fields), placed on
  the mesh."""
  return sharding.global_batch(
      {**data_lib.model_inputs(batch), **{k: batch[k] for k in extra}},
      mesh, whole=True)


# ================================================================ training


def train_in_chunks(task: tasks.Task, cfg: ml_collections.ConfigDict, *,
                    data: data_lib.TrainData, run_dir: str, every: int,
                    mesh: jax.sharding.Mesh, rules: Any, seed: int = 0
                    ) -> Iterator[tuple[int, Any, float]]:
  """`train.run_training` of `task`, paused every `every` steps.

  Yields (step, params, loss of that step's batch) at every multiple of
  `every` and at `cfg.steps`; `params` are the frozen and the trained trees
  together, what `task.apply` takes. Each pause is a `stop_after` of
  run_training, which resumes from its checkpoint in `run_dir`, so a
  run_dir that already holds a run resumes it: from the first eval point at
  or after its checkpoint. `cfg.log_every` must be 1: the loss of every step
  is read back from `run_dir/history.json` (NaN for a step a killed run did
  not record).
  """
  if cfg.log_every != 1:
    raise ValueError(f'log_every={cfg.log_every}: train_in_chunks reads the '
                     'loss of every eval step; set log_every=1.')
  ckpt = checkpoints.RunCheckpointer(os.path.join(run_dir, 'checkpoints'))
  start = ckpt.latest_step() or 0
  ckpt.close()
  points = sorted({s for s in range(every, cfg.steps + 1, every)} |
                  {cfg.steps})
  for step in (s for s in points if s >= start):
    params, _ = train.run_training(task, cfg, run_dir=run_dir, data=data,
                                   mesh=mesh, rules=rules, seed=seed,
                                   stop_after=step)
    with open(os.path.join(run_dir, 'history.json')) as f:
      loss = {h['step']: h['loss'] for h in json.load(f)}.get(step)
    yield (step, {**task.frozen, **params},
           float('nan') if loss is None else loss)


def exact_match_fn(task: tasks.Task):
  """A jitted (params, batch) -> (exact rows, valid rows) of one forward.

  A row is exact when the argmax at every weighted position is its target:
  teacher-forced, which is what greedy decoding yields when it is right.
  Padding rows (`valid` False) count in neither.
  """
  def count(params, batch):
    hit = task.apply(params, batch).argmax(-1) == batch['targets']
    exact = (hit | (batch['weights'] == 0)).all(-1) & batch['valid']
    return exact.sum(), batch['valid'].sum()
  return jax.jit(count)


def exact_match(count_fn, params: Any, batches, mesh: jax.sharding.Mesh
                ) -> float:
  """The fraction of valid rows of `batches` that `count_fn` finds exact."""
  exact = valid = 0
  for b in batches:
    e, v = jax.device_get(count_fn(params, on_mesh(b, mesh, 'valid')))
    exact, valid = exact + int(e), valid + int(v)
  return exact / max(valid, 1)
