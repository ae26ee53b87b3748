"""The training loop: frozen trees, checkpoint contents, resumption, smoke run."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

from absl import flags
from absl.testing import absltest
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from calm_jax import aug_cache
from calm_jax import checkpoints
from calm_jax import config_lib
from calm_jax import data as data_lib
from calm_jax import profiling
from calm_jax import rows as rows_lib
from calm_jax import sharding
from calm_jax import tasks
from calm_jax import train
from calm_jax.models import composition as C
from experiments import kv_arithmetic
from tests import fixtures


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def tiny_config():
  """The smoke experiment shrunk to seconds."""
  config = kv_arithmetic.get_config('smoke')
  for m in [config.models.anchor] + list(config.models.augmenting.values()):
    m.pretrain.steps = 8
    m.pretrain.batch_size = 8
    m.pretrain.log_every = 4
  config.train.steps = 4
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.eval_every = 2
  config.eval.num_examples = 8
  config.eval.batch_size = 8
  config.eval.max_new_tokens = 20
  return config


def _numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


class TokenAccuracyTest(absltest.TestCase):

  def test_argmax_is_jnp_argmax_first_maximum_included(self):
    logits = jax.random.normal(jax.random.key(0), (3, 5, 771))
    # Ties: the first maximum wins, as in jnp.argmax.
    logits = logits.at[0, 0].set(0.0).at[1, 2, 7].set(9.0).at[
        1, 2, 3].set(9.0)
    np.testing.assert_array_equal(tasks.argmax(logits),
                                  jnp.argmax(logits, -1))
    self.assertEqual(int(tasks.argmax(logits)[1, 2]), 3)
    self.assertEqual(int(tasks.argmax(logits)[0, 0]), 0)


class TrainLoopTest(absltest.TestCase):
  """run_training on a composition whose frozen models are random."""

  def setUp(self):
    super().setUp()
    self.workdir = self.create_tempdir().full_path
    self.config = tiny_config()
    self.config.train.steps = 6
    self.mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
    self.rules = sharding.logical_rules(())
    self.data = data_lib.Data(self.config.data, self.workdir)
    anchor = config_lib.decoder_config(self.config.models.anchor,
                                       'models.anchor')
    self.augmenting = config_lib.augmenting_models(self.config)
    frozen = {'anchor': self._init(anchor, 1)}
    for a in self.augmenting:
      frozen[f'aug_{a.name}'] = self._init(a.config, 2)
    self.frozen = frozen
    self.task = tasks.composition_task(frozen, anchor, self.augmenting,
                                       bridge=C.BridgeConfig())

  def _init(self, arch, seed):
    """A random frozen model, placed on the mesh as a loaded one would be."""
    task = tasks.decoder_task('x', arch)
    return jax.jit(lambda r: nn.meta.unbox(task.init_trainable(r)),
                   out_shardings=train.decoder_shardings(
                       arch, self.mesh, self.rules))(jax.random.key(seed))

  def _run(self, run_dir, **kw):
    return train.run_training(
        self.task, self.config.train, run_dir=run_dir,
        data=self.data.train(self.config.train.split), mesh=self.mesh,
        rules=self.rules, seed=0, **kw)

  def test_frozen_trees_unchanged_and_checkpoint_holds_only_composition(self):
    before = _numpy(self.frozen)
    params, history = self._run(os.path.join(self.workdir, 'run'))
    self.assertEqual(list(params), ['composition'])
    self.assertLen(history, 6)
    self.assertTrue(all(np.isfinite(h['loss']) for h in history))
    # Frozen trees: bit-identical after training.
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           _numpy(self.frozen))
    # The composition moved.
    init = jax.jit(self.task.init_trainable)(jax.random.key(0))
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.abs(a - b).max()), nn.meta.unbox(init), params)
    self.assertGreater(max(jax.tree_util.tree_leaves(moved)), 0.0)
    # The checkpoint: composition params, its optimizer state and the step.
    ckpt_dir = os.path.join(self.workdir, 'run', 'checkpoints')
    self.assertEqual(sorted(os.listdir(ckpt_dir)), ['4', '6'])
    raw = ocp.StandardCheckpointer().restore(
        os.path.join(ckpt_dir, '6', 'state'))
    self.assertEqual(sorted(raw), ['opt', 'params', 'step'])
    self.assertEqual(list(raw['params']), ['composition'])
    saved = {k for path, _ in jax.tree_util.tree_leaves_with_path(raw)
             for k in map(str, path)}
    self.assertFalse(any('anchor' in k or 'aug_' in k for k in saved), saved)
    self.assertEqual(int(raw['step']), 6)
    n_saved = sum(np.size(x) for x in jax.tree_util.tree_leaves(raw))
    n_comp = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    self.assertLess(n_saved, 3 * n_comp + 10)  # params + Adam mu, nu + count.

  def test_profile_steps_traces_those_steps_with_the_compiled_hlo(self):
    self.config.train.steps = profiling.PROFILE_AFTER + 4
    self.config.train.profile_steps = 2
    run_dir = os.path.join(self.workdir, 'run')
    self._run(run_dir)
    trace_dir = os.path.join(run_dir, 'profile')
    self.assertEqual(profiling.traced_steps(trace_dir), 2)
    with open(os.path.join(trace_dir, profiling.HLO_FILE)) as f:
      self.assertIn('ENTRY', f.read())
    prof = profiling.op_profile(trace_dir, 2)
    self.assertNotIn('error', prof)
    # The two steps' own executions, each op traced back to the jax op.
    self.assertGreater(prof['wall_ms'], 0.0)
    self.assertTrue(prof['kinds_ms'])
    self.assertTrue(any('train_step' in origin
                        for _, _, origin in prof['top_ops_ms']), prof)

  def test_resume_gives_the_same_next_step_loss(self):
    _, full = self._run(os.path.join(self.workdir, 'full'))
    part_dir = os.path.join(self.workdir, 'part')
    _, first = self._run(part_dir, stop_after=4)
    self.assertEqual([h['step'] for h in first], [1, 2, 3, 4])
    # A save killed mid-write leaves only a temporary directory behind.
    os.makedirs(os.path.join(part_dir, 'checkpoints',
                             '5.orbax-checkpoint-tmp-1234', 'state'))
    _, rest = self._run(part_dir)
    self.assertEqual([h['step'] for h in rest], [5, 6])
    np.testing.assert_allclose([h['loss'] for h in first + rest],
                               [h['loss'] for h in full], rtol=1e-6)

  def test_a_run_of_the_same_structure_traces_no_new_step(self):
    # Rows and seeds of one structure (calm over a vanilla or random m_A,
    # another seed) share the traced update (`train._shared_step`) and the
    # loss program of the evals (`tasks.nll_program`).
    traced = []

    def listen(event, _, fun_name='', **__):
      if event == '/jax/core/compile/jaxpr_trace_duration':
        traced.append(fun_name)

    evals = self.data.eval(self.config.eval.during_training_split, 8, 8)
    _, first = self._run(os.path.join(self.workdir, 'a'), eval_batches=evals)
    other = tasks.composition_task(
        {'anchor': self.frozen['anchor'],
         **{f'aug_{a.name}': self._init(a.config, 3)
            for a in self.augmenting}},
        self.task.model.anchor, self.augmenting, bridge=C.BridgeConfig())
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
      _, second = train.run_training(
          other, self.config.train, run_dir=os.path.join(self.workdir, 'b'),
          data=self.data.train(self.config.train.split), mesh=self.mesh,
          rules=self.rules, seed=1, eval_batches=evals)
    finally:
      jax.monitoring.unregister_event_duration_listener(listen)
    self.assertIn('init_state', traced)  # The listener hears traces.
    self.assertNotIn('train_step', traced)
    self.assertNotIn('<lambda>', traced)  # nll_program's loss.
    # Its own weights and seed all the same.
    self.assertNotEqual([h['loss'] for h in first],
                        [h['loss'] for h in second])

  def test_an_asynchronous_checkpoint_holds_the_state_of_its_step(self):
    # Checkpoints are written in the background while the next steps run
    # (and donate the state's buffers): the one saved at step 4 (not the
    # last, so not waited for) must still be step 4's state and data
    # position.
    run_dir = os.path.join(self.workdir, 'async')
    _, full = self._run(run_dir)  # Saves at 2, 4 and 6; keeps 4 and 6.
    ckpts = os.path.join(run_dir, 'checkpoints')
    self.assertEqual(sorted(os.listdir(ckpts)), ['4', '6'])
    shutil.rmtree(os.path.join(ckpts, '6'))
    _, rest = self._run(run_dir)
    self.assertEqual([h['step'] for h in rest], [5, 6])
    np.testing.assert_allclose([h['loss'] for h in rest],
                               [h['loss'] for h in full[4:]], rtol=1e-6)

  def test_write_penalty_is_the_mean_squared_bridge_write(self):
    self.assertIsNone(self.task.loss)  # The paper: the cross-entropy alone.
    task = tasks.composition_task(self.frozen, self.task.model.anchor,
                                  self.augmenting, bridge=C.BridgeConfig(),
                                  write_penalty=0.25)
    params = {**self.frozen,
              **nn.meta.unbox(jax.jit(task.init_trainable)(
                  jax.random.key(0)))}
    # Non-zero writes: the output projections start at zero.
    params['composition'] = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if 'out' in str(p) else x,
        params['composition'])
    batch = next(self.data.train(self.config.train.split).iterator(
        4, seed=0))
    batch = {k: jnp.asarray(v)
             for k, v in data_lib.model_inputs(batch).items()}
    loss, aux = task.loss_fn(params, batch)
    xent, _ = tasks.weighted_xent(task.apply(params, batch), batch)
    np.testing.assert_allclose(aux['xent'], xent, rtol=1e-5)
    penalty = aux['penalty']
    np.testing.assert_allclose(loss, xent + penalty, rtol=1e-5)
    # By hand, from the per-token squared norms the model sows.
    _, cols = task.model.apply(
        {'params': params}, batch['inputs'], prompt_len=batch['prompt_len'],
        mutable=['intermediates'])
    sq = sum(v[0] for k, v in cols['intermediates'].items()
             if k.startswith('write_sq_'))
    n_real = batch['prompt_len'] + batch['weights'].sum(-1) - 1
    real = np.arange(sq.shape[1])[None] < np.asarray(n_real)[:, None]
    self.assertGreater(float(sq.min()), 0.0)
    np.testing.assert_allclose(penalty, 0.25 * np.asarray(sq)[real].mean(),
                               rtol=1e-5)
    # Training logs the cross-entropy as `loss` and the penalty beside it.
    self.task = task
    _, history = self._run(os.path.join(self.workdir, 'pen'))
    # (Zero while the output projections are still at their zero init.)
    self.assertTrue(all('penalty' in h for h in history), history)
    self.assertGreater(history[-1]['penalty'], 0.0)

  def test_bfloat16_frozen_models(self):
    anchor, frozen = train.cast_frozen(self.task.model.anchor,
                                       self.frozen['anchor'], 'bfloat16')
    aug = tuple(dataclasses.replace(a, config=train.cast_frozen(
        a.config, {}, 'bfloat16')[0]) for a in self.augmenting)
    frozen = {'anchor': frozen, **{
        k: train.cast_frozen(a.config, self.frozen[k], 'bfloat16')[1]
        for a in self.augmenting for k in [f'aug_{a.name}']}}
    self.task = tasks.composition_task(frozen, anchor, aug,
                                       bridge=C.BridgeConfig())
    self.config.train.steps = 3
    params, history = self._run(os.path.join(self.workdir, 'bf16'))
    self.assertTrue(all(np.isfinite(h['loss']) for h in history))
    for leaf in jax.tree_util.tree_leaves(frozen):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    for leaf in jax.tree_util.tree_leaves(params):
      self.assertEqual(leaf.dtype, jnp.float32)

  def test_augmenting_state_cache_gives_the_same_losses(self):
    self.config.train.steps = 4
    _, live = self._run(os.path.join(self.workdir, 'live'))
    train_data = self.data.train(self.config.train.split)
    cache_dir = os.path.join(self.workdir, 'aug_cache')
    aug_cache.build(cache_dir, self.augmenting, self.frozen,
                    train_data.source, tokenizer=self.data.tokenizer,
                    seq_len=train_data.seq_len)
    cached_data = dataclasses.replace(
        train_data, source=aug_cache.CachedSource(train_data.source,
                                                  cache_dir))
    example = cached_data.source[0]
    self.assertEqual(example['cached/kv/1'].shape,
                     (train_data.seq_len, self.augmenting[0].config.d_model))
    _, cached = train.run_training(
        self.task, self.config.train,
        run_dir=os.path.join(self.workdir, 'cached'), data=cached_data,
        mesh=self.mesh, rules=self.rules, seed=0)
    np.testing.assert_allclose([h['loss'] for h in cached],
                               [h['loss'] for h in live], rtol=1e-5)

  def test_corrupted_run_checkpoint_is_a_clear_error(self):
    run_dir = os.path.join(self.workdir, 'run')
    self._run(run_dir, stop_after=2)
    state_dir = os.path.join(run_dir, 'checkpoints', '2', 'state')
    for root, _, files in os.walk(state_dir):
      for f in files:
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'garbage')
    with self.assertRaisesRegex(ValueError, r'checkpoints/2 is corrupted'):
      self._run(run_dir)


class DataCheckedFirstTest(absltest.TestCase):

  def test_a_too_short_length_fails_before_any_model_trains(self):
    for field, cfg in (
        ('models.augmenting.kv.pretrain.seq_len',
         lambda c: c.models.augmenting.kv.pretrain),
        ('train.seq_len', lambda c: c.train)):
      with self.subTest(field):
        config = tiny_config()
        cfg(config).seq_len = 12
        workdir = self.create_tempdir().full_path
        with self.assertRaisesRegex(
            ValueError, rf'^{re.escape(field)}=12 is too short: an example '
            'needs'):
          train.train_and_evaluate(config, workdir)
        # Not even the anchor, which comes first and would fit.
        self.assertFalse(os.path.exists(os.path.join(workdir, 'pretrain')))
        self.assertFalse(os.path.exists(os.path.join(workdir, 'models')))


class RunCheckpointerTest(absltest.TestCase):

  def test_resumes_a_run_saved_through_orbax_standard_handler(self):
    # Runs checkpointed before 872c254 went through StandardSave (Orbax's
    # default handler, replica-parallel saves); the same format resumes.
    directory = self.create_tempdir().full_path
    data = grain.MapDataset.range(10).to_iter_dataset()
    it = iter(data)
    next(it), next(it)
    state = {'params': {'w': jnp.arange(6.0).reshape(2, 3)},
             'step': jnp.int32(2)}
    with ocp.CheckpointManager(directory, item_names=('state', 'data')) as m:
      m.save(2, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(it)))
      m.wait_until_finished()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
        state)
    ckpt = checkpoints.RunCheckpointer(directory)
    fresh = iter(data)
    step, restored = ckpt.restore(abstract, fresh)
    self.assertEqual(step, 2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
    self.assertEqual(next(fresh), 2)  # The data position came back too.
    # And it saves on from there.
    ckpt.save(3, restored, fresh, force=True)
    ckpt.close()
    self.assertEqual(ckpt.latest_step(), 3)


class SmokePipelineTest(absltest.TestCase):

  def test_end_to_end_and_rerun_resumes(self):
    workdir = self.create_tempdir().full_path
    results = train.train_and_evaluate(tiny_config(), workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      on_disk = json.load(f)
    self.assertEqual(on_disk['rows'], json.loads(json.dumps(results['rows'])))
    # Every row of the paper's table runs at smoke size.
    self.assertEqual(sorted(on_disk['rows']), sorted(tiny_config().rows))
    self.assertLen(tiny_config().rows, 12)
    for row in on_disk['rows'].values():
      self.assertEqual(sorted(row), sorted(kv_arithmetic.get_config(
          'smoke').eval.splits))
      for metrics in row.values():
        # Exact match over the 8 examples: a whole number of them.
        self.assertIn(round(metrics['accuracy'] * 8 / 100, 6), range(9))
        self.assertTrue(np.isfinite(metrics['loss']))
        self.assertEqual(metrics['examples'], 8)
    # The trained rows moved away from m_B (their bridges or weights are no
    # longer at the anchor's own function).
    m_b = on_disk['rows']['m_B']['kv_math_eval']['loss']
    for name in ('calm', 'calm_paper', 'lora', 'full_ft', 'calm_n1'):
      self.assertNotAlmostEqual(on_disk['rows'][name]['kv_math_eval']['loss'],
                                m_b, places=5)
    # calm_paper is the paper's bridge by the paper's rule (4-layer m_A: one
    # pair, its last layer into the anchor's last), whatever the config says.
    with open(os.path.join(workdir, 'runs', 'calm_paper', 'seed_0',
                           'composition.json')) as f:
      paper = json.load(f)
    self.assertEqual(paper['bridge']['name'], 'paper')
    self.assertEqual(paper['augmenting'][0]['pairs'], [[3, 3]])
    for role in ('anchor', 'aug_kv', 'vanilla_kv'):
      self.assertTrue(checkpoints.model_exists(
          os.path.join(workdir, 'models', role)))
    # What launch/local.py schedules by: exactly the frozen rows train
    # nothing.
    self.assertEqual(
        sorted(os.listdir(os.path.join(workdir, 'runs'))),
        sorted(r for r in tiny_config().rows if not rows_lib.ROWS[r].frozen))
    self.assertTrue(any(f.startswith('events') for f in os.listdir(
        os.path.join(workdir, 'runs', 'calm', 'seed_0', 'tensorboard'))))
    for name in ('results.md', 'results.png'):
      self.assertGreater(os.path.getsize(os.path.join(workdir, name)), 100)
    # LoRA's rank is matched to CALM's trainable parameter count.
    sizes = results['trainable_params']
    self.assertLess(abs(sizes['lora'] - sizes['calm']) / sizes['calm'], 0.1)
    # The command line streams a completion from the trained composition.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, '-m', 'calm_jax.generate',
         f'--anchor={workdir}/models/anchor',
         f'--augmenting=kv={workdir}/models/aug_kv',
         f'--composition={workdir}/runs/calm/seed_0/checkpoints',
         '--prompt=ab+cd-ef=', '--max_new_tokens=8'],
        capture_output=True, text=True, timeout=300, cwd=root,
        env=dict(os.environ, PYTHONPATH=root,
                 XLA_FLAGS=fixtures.ONE_DEVICE_XLA_FLAGS))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertTrue(proc.stdout.startswith('ab+cd-ef='), proc.stdout)
    # Rerunning the same workdir retrains nothing and gives the same table
    # (a few rows: re-scoring all 11 would double the test's compile time).
    rerun = tiny_config()
    rerun.rows = ('m_B', 'calm', 'lora', 'calm_vanilla_aug')
    again = train.train_and_evaluate(rerun, workdir)
    self.assertEqual(again['rows'],
                     {row: results['rows'][row] for row in rerun.rows})


if __name__ == '__main__':
  absltest.main()
