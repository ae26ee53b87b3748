"""Sharded training steps match the single-device step on any mesh.

Forces 8 CPU devices, builds a tiny ComposedLM, and runs one jitted
loss + grad + AdamW step (composition params only) on several meshes, with
explicit in/out shardings, against the unsharded result. A second test runs
the same step as 2 processes x 4 devices through jax.distributed.
"""

import os
import sys

# Must be set before the jax backend starts; importing jax alone does not
# start it, so this also works if another test imported jax first.
_DEVICES_FLAG = '--xla_force_host_platform_device_count=8'
_xla_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _xla_flags:
  os.environ['XLA_FLAGS'] = f'{_xla_flags} {_DEVICES_FLAG}'.strip()

import json
import subprocess
import tempfile
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import portpicker

from calm_jax import distributed
from calm_jax import sharding
from calm_jax.models import composition
from calm_jax.models import transformer

BATCH, SEQ, VOCAB = 8, 16, 64
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _require_devices(n: int = 8) -> None:
  if jax.device_count() != n:
    raise unittest.SkipTest(
        f'needs {n} devices, found {jax.device_count()}: the jax backend '
        'started before this file could set XLA_FLAGS; run this file alone '
        f'or with XLA_FLAGS={_DEVICES_FLAG}.')


# --------------------------------------------------------------------------
# The model, data and step shared by the tests and the multi-process worker.


def _model() -> composition.ComposedLM:
  anchor = transformer.DecoderConfig(
      vocab_size=VOCAB, d_model=32, num_layers=4, num_heads=4, d_ff=64,
      max_len=SEQ)
  aug = transformer.DecoderConfig(
      vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2, d_ff=32,
      max_len=SEQ)
  pairs = composition.select_pairs(4, 4, every_k=2)
  return composition.ComposedLM(
      anchor, (composition.Augmenting('kv', aug, pairs),))


def _tokens() -> jax.Array:
  return jnp.zeros((BATCH, SEQ), jnp.int32)


def _host_params(model: composition.ComposedLM) -> dict:
  """Deterministic numpy params; bridge outputs made non-zero for gradients."""
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, _tokens())))
  params = jax.device_get(init(jax.random.key(0))['params'])
  rng = np.random.RandomState(1)
  # W_O starts at zero (the composed model begins as the anchor), which would
  # leave every other bridge weight without gradient.
  for bridge in params['composition'].values():
    out = bridge['out']['kernel']
    bridge['out']['kernel'] = (0.1 * rng.randn(*out.shape)).astype(out.dtype)
  return params


def _host_batch() -> dict[str, np.ndarray]:
  rng = np.random.RandomState(2)
  return {
      'inputs': rng.randint(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
      'targets': rng.randint(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
      'weights': (rng.rand(BATCH, SEQ) > 0.3).astype(np.float32),
      'prompt_len': rng.randint(1, SEQ, (BATCH,)).astype(np.int32),
  }


def _split(tree: dict) -> tuple[dict, dict]:
  """(frozen, trainable) by top-level key."""
  trainable = {k: v for k, v in tree.items() if k == 'composition'}
  frozen = {k: v for k, v in tree.items() if k != 'composition'}
  return frozen, trainable


def _optimizer() -> optax.GradientTransformation:
  return optax.adamw(1e-3, weight_decay=0.1)


def _make_step(model: composition.ComposedLM,
               tx: optax.GradientTransformation):
  """Weighted next-token loss, gradient w.r.t. the composition, AdamW."""

  def step(trainable, opt_state, frozen, batch):
    def loss_fn(trainable):
      logits = model.apply({'params': {**frozen, **trainable}},
                           batch['inputs'], prompt_len=batch['prompt_len'])
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['targets'])
      return jnp.sum(ce * batch['weights']) / jnp.sum(batch['weights'])

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def _sharded_step(mesh, model, params, host_batch):
  """Places everything on `mesh` and runs one jitted step there."""
  tx = _optimizer()
  abstract = jax.eval_shape(model.init, jax.random.key(0), _tokens())['params']
  shardings = sharding.param_shardings(abstract, mesh, sharding.logical_rules())
  frozen_sh, train_sh = _split(shardings)
  opt_sh = sharding.opt_state_shardings(
      tx, _split(nn.meta.unbox(abstract))[1], train_sh, mesh)
  frozen, trainable = _split(jax.device_put(params, shardings))
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  batch = sharding.global_batch(host_batch, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch}
  step = jax.jit(
      _make_step(model, tx),
      in_shardings=(train_sh, opt_sh, frozen_sh, batch_sh),
      out_shardings=(train_sh, opt_sh, sharding.replicated(mesh)),
      donate_argnums=(0, 1))
  with jax.set_mesh(mesh):  # As the training loop runs its step.
    new_trainable, _, loss = step(trainable, opt_state, frozen, batch)
  return new_trainable, loss, train_sh


# --------------------------------------------------------------------------
# Single process, 8 devices.


class ShardedStepTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _require_devices()
    cls.model = _model()
    cls.params = _host_params(cls.model)
    cls.batch = _host_batch()
    tx = _optimizer()
    frozen, trainable = _split(cls.params)
    # The reference: plain jit on one device, no shardings anywhere.
    cls.ref_trainable, _, cls.ref_loss = jax.device_get(jax.jit(
        _make_step(cls.model, tx))(trainable, tx.init(trainable), frozen,
                                   cls.batch))

  def assert_matches_reference(self, new_trainable, loss):
    np.testing.assert_allclose(loss, self.ref_loss, rtol=0, atol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(self.ref_trainable)
    flat_new = jax.tree_util.tree_leaves(new_trainable)
    self.assertLen(flat_new, len(flat_ref))
    for (path, ref), new in zip(flat_ref, flat_new):
      np.testing.assert_allclose(
          np.asarray(new), ref, rtol=0, atol=1e-5,
          err_msg=jax.tree_util.keystr(path))

  @parameterized.parameters((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
  def test_step_matches_single_device(self, data, fsdp, tensor):
    mesh = sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))
    self.assertEqual(dict(mesh.shape),
                     dict(data=data, fsdp=fsdp, tensor=tensor))
    new_trainable, loss, train_sh = _sharded_step(
        mesh, self.model, self.params, self.batch)
    self.assert_matches_reference(new_trainable, loss)
    # The outputs really carry the requested layouts.
    for new, sh in zip(jax.tree_util.tree_leaves(new_trainable),
                       jax.tree_util.tree_leaves(train_sh)):
      self.assertTrue(new.sharding.is_equivalent_to(sh, new.ndim))

  def test_bridges_pin_their_activations_to_the_batch_axes(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    x = jnp.ones((8, 4, 16))
    self.assertIs(composition.constrain_batch(x), x)  # No mesh: untouched.
    with jax.set_mesh(mesh):
      y = jax.jit(lambda x: composition.constrain_batch(x * 2))(x)
      odd = jax.jit(lambda x: composition.constrain_batch(x * 2))(
          jnp.ones((3, 4, 16)))  # Not divisible: left to GSPMD.
      lowered = jax.jit(lambda p, t: self.model.apply(
          {'params': p}, t, prompt_len=jnp.full((8,), 4))).lower(
              self.params, jnp.zeros((8, 16), jnp.int32)).as_text()
    self.assertTrue(y.sharding.is_equivalent_to(jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))), 3))
    self.assertTrue(odd.sharding.is_fully_replicated)
    # Both inputs and the output of every bridge.
    bridges = sum(len(a.pairs) for a in self.model.augmenting)
    self.assertGreaterEqual(lowered.count('sharding_constraint'),
                            3 * bridges, lowered[:2000])

  def test_reference_trains_every_bridge_weight(self):
    """Guards the test itself: every composition leaf gets a gradient.

    Adam's first step moves each weight with a non-zero gradient by about
    the learning rate (1e-3); weight decay alone moves it by at most 1e-4.
    """
    _, trainable = _split(self.params)
    for path, new in jax.tree_util.tree_leaves_with_path(self.ref_trainable):
      old = trainable
      for key in path:
        old = old[key.key]
      self.assertGreater(np.abs(new - old).max(), 5e-4,
                         jax.tree_util.keystr(path))

  def test_param_shardings_follow_rules(self):
    abstract = jax.eval_shape(self.model.init, jax.random.key(0),
                              _tokens())['params']
    rules = sharding.logical_rules()
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    specs = jax.tree.map(lambda s: s.spec,
                         sharding.param_shardings(abstract, mesh, rules))
    P = jax.sharding.PartitionSpec
    self.assertEqual(specs['anchor']['embedding'], P('tensor', 'fsdp'))
    self.assertEqual(specs['anchor']['layer_0']['attn']['query']['kernel'],
                     P('fsdp', 'tensor', None))
    self.assertEqual(specs['anchor']['layer_0']['mlp']['wo']['kernel'],
                     P('tensor', 'fsdp'))
    bridge = specs['composition']['kv_1_1']
    self.assertEqual(bridge['proj']['kernel'], P(None, 'fsdp'))
    self.assertEqual(bridge['out']['kernel'], P('tensor', None, 'fsdp'))

    # 8-way tensor: 4 anchor heads and 2 augmenting heads do not divide, so
    # those dims are replicated (and logged); mlp and vocab still shard.
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
    with self.assertLogs('absl', 'INFO') as logs:
      specs = jax.tree.map(lambda s: s.spec,
                           sharding.param_shardings(abstract, mesh, rules))
    self.assertEqual(specs['anchor']['layer_0']['attn']['query']['kernel'],
                     P('fsdp', None, None))
    self.assertEqual(specs['anchor']['layer_0']['mlp']['wi']['kernel'],
                     P('fsdp', 'tensor'))
    self.assertEqual(specs['anchor']['embedding'], P('tensor', 'fsdp'))
    logs = '\n'.join(logs.output)
    self.assertIn("Replicating logical axis 'heads' (size 4, not divisible by "
                  "mesh axis 'tensor' of size 8)", logs)
    self.assertIn("'kv_heads' (size 2", logs)

  def test_rules_override(self):
    rules = sharding.logical_rules([['vocab', None], ['mlp', ['fsdp']]])
    self.assertEqual(rules[:2], (('vocab', None), ('mlp', ('fsdp',))))
    self.assertIn(('embed', 'fsdp'), rules)
    self.assertNotIn(('vocab', 'tensor'), rules)
    with self.assertRaisesRegex(ValueError,
                                r"mesh.rules\[0\].*'model'"):
      sharding.logical_rules([['vocab', 'model']])
    with self.assertRaisesRegex(ValueError, r'mesh.rules\[0\].*pair'):
      sharding.logical_rules(['vocab'])

  def test_mesh_errors_name_the_field(self):
    mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
    self.assertEqual(mesh.shape['data'], 2)
    bad = [
        (dict(data=3), r'mesh\.data .*8 devices.*product is 8'),
        (dict(data=-1, fsdp=3), r'mesh\.fsdp .*8 devices'),
        (dict(data=2, fsdp=2), r'mesh\.data x mesh\.fsdp .*8 devices'),
        (dict(data=-1, tensor=-1),
         r'Only one mesh axis may be -1.*mesh\.tensor'),
        (dict(data=0), r'mesh\.data=0 must be a positive int'),
        (dict(model=8), r'mesh\.model=8: unknown mesh axis'),
    ]
    for shape, pattern in bad:
      with self.subTest(shape=shape):
        with self.assertRaisesRegex(ValueError, pattern):
          sharding.make_mesh(shape)

  def test_batch_size_errors_name_the_field(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    self.assertEqual(sharding.check_batch_size(8, mesh), 8)
    with self.assertRaisesRegex(
        ValueError, r'train\.batch_size=6 .* 4 data-parallel devices.*'
        r'multiple of 4'):
      sharding.check_batch_size(6, mesh)
    with self.assertRaisesRegex(ValueError, r'eval\.batch_size=0'):
      sharding.check_batch_size(0, mesh, field='eval.batch_size')

  def test_global_batch(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    batch = sharding.global_batch(self.batch, mesh)
    for key, value in batch.items():
      np.testing.assert_array_equal(np.asarray(value), self.batch[key])
      self.assertEqual(value.sharding, sharding.batch_sharding(mesh))
      self.assertEqual(value.addressable_shards[0].data.shape[0], BATCH // 4)
    with self.assertRaisesRegex(TypeError, "'text'"):
      sharding.global_batch({'text': np.array(['a'] * 8, object)}, mesh)
    with self.assertRaisesRegex(ValueError, "'inputs' has 6 rows"):
      sharding.global_batch({'inputs': self.batch['inputs'][:6]}, mesh)
    whole = sharding.global_batch(self.batch, mesh, whole=True)
    for key, value in whole.items():
      np.testing.assert_array_equal(np.asarray(value), self.batch[key])

  def test_two_processes_match_single_device(self):
    """2 processes x 4 CPU devices, jax.distributed over 127.0.0.1 (gloo)."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT,
               XLA_FLAGS='--xla_force_host_platform_device_count=4')
    with tempfile.TemporaryDirectory() as tmp:
      procs = [subprocess.Popen(
          [sys.executable, '-c',
           f'import sys; sys.path.insert(0, {TESTS_DIR!r}); '
           f'import sharding_test; '
           f'sharding_test._worker({i}, {port}, {tmp!r})'],
          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True) for i in range(2)]
      outputs = []
      for p in procs:
        try:
          outputs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
          for q in procs:
            q.kill()
          self.fail('multi-process step timed out')
      for p, out in zip(procs, outputs):
        self.assertEqual(p.returncode, 0, out[-3000:])
      with open(os.path.join(tmp, 'result.json')) as f:
        result = json.load(f)
    self.assertEqual(result['process_count'], 2)
    self.assertEqual(result['device_count'], 8)
    self.assertEqual(result['local_rows'], BATCH // 2)
    self.assertEqual(result['batch_diff'], 0)
    np.testing.assert_allclose(result['loss'], self.ref_loss, rtol=0, atol=1e-5)
    ref_sum = sum(float(np.sum(x)) for x in
                  jax.tree_util.tree_leaves(self.ref_trainable))
    np.testing.assert_allclose(result['param_sum'], ref_sum, rtol=1e-6)


def _worker(process_id: int, port: int, out_dir: str) -> None:
  """One process of the 2-process test; process 0 writes the result."""
  distributed.initialize(f'127.0.0.1:{port}', 2, process_id)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = _model()
  local_rows = sharding.check_batch_size(BATCH, mesh)
  # Each process feeds its own rows, as a per-process pipeline would.
  start = process_id * local_rows
  local = {k: v[start:start + local_rows] for k, v in _host_batch().items()}
  new_trainable, loss, _ = _sharded_step(mesh, model, _host_params(model),
                                         local)
  reduce = lambda f, tree: jax.jit(
      lambda t: sum(f(x) for x in jax.tree_util.tree_leaves(t)),
      out_shardings=sharding.replicated(mesh))(tree)
  param_sum = reduce(jnp.sum, new_trainable)
  # Eval-style input: every process passes the same whole batch.
  host = _host_batch()
  batch_diff = reduce(lambda x: jnp.abs(x).max(), jax.tree.map(
      lambda a, b: a - b, sharding.global_batch(local, mesh),
      sharding.global_batch(host, mesh, whole=True)))
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, 'result.json'), 'w') as f:
      json.dump(dict(loss=float(loss), param_sum=float(param_sum),
                     batch_diff=float(batch_diff),
                     local_rows=local_rows, process_count=jax.process_count(),
                     device_count=jax.device_count()), f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  absltest.main()
