"""What the KV probes read: the task of a kv_arithmetic workdir and one of its
models, or (`tiny`) the smoke task and a random model, for the tests."""

import dataclasses
import json
import os
import tempfile

from absl import app
from absl import flags


def load(workdir: str, role: str, tiny: bool):
  """Returns (task config, DecoderConfig, params, tokenizer) of a model.

  The model is WORKDIR/models/ROLE; the tokenizer is the run's
  `data.tokenizer`.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from calm_jax import checkpoints
  from calm_jax.data import kv_arithmetic as kv
  from calm_jax.data import tokenizers
  from calm_jax.models import transformer

  if tiny:
    task, tokenizer = kv.SMOKE_CONFIG, 'byte'
    arch = transformer.DecoderConfig(vocab_size=259, d_model=32, num_layers=2,
                                     num_heads=2, d_ff=64, max_len=64)
    params = nn.meta.unbox(transformer.Decoder(arch).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
    model_dir = os.path.join(tempfile.mkdtemp(), role)
    checkpoints.save_model(model_dir, arch, params, role=role)
  else:
    if not workdir:
      raise app.UsageError('--workdir is required (a calm_jax.main workdir '
                           'of experiments/kv_arithmetic.py).')
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    if config['data']['dataset'] != 'kv_arithmetic':
      raise app.UsageError(f'{workdir} holds a '
                           f'{config["data"]["dataset"]!r} run; this probe '
                           'needs kv_arithmetic.')
    task = kv.make_config(**config['data']['kv'])
    tokenizer = config['data'].get('tokenizer', 'byte')
    model_dir = os.path.join(workdir, 'models', role)
  arch, params = checkpoints.load_model(model_dir, '--workdir')
  return task, arch, params, tokenizers.get_tokenizer(tokenizer)


def load_composed(workdir: str, run: str, seed: int, tiny: bool):
  """Returns (task, model, params, tokenizer) of a trained composed row.

  The row is WORKDIR/runs/RUN/seed_SEED (its last checkpoint), over
  WORKDIR/models/{anchor,aug_kv}; `tiny`: random models and bridges (with
  non-zero output projections) on the smoke task, for the tests.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from calm_jax import checkpoints
  from calm_jax.models import composition as composition_lib

  task, anchor_cfg, anchor, tok = load(workdir, 'anchor', tiny)
  _, aug_cfg, aug, _ = load(workdir, 'aug_kv', tiny)
  if tiny:
    pairs = ((0, -1), (1, 1))
    model = composition_lib.ComposedLM(
        anchor_cfg, (composition_lib.Augmenting('kv', aug_cfg, pairs),),
        recency_bias=True)
    comp = nn.meta.unbox(model.init(
        jax.random.key(1), jnp.ones((1, 8), jnp.int32))['params'][
            'composition'])
    # Non-zero output projections, so that the writes are not all zero.
    comp = jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.random.normal(jax.random.key(2), x.shape)
                      if 'out' in jax.tree_util.keystr(p) else x), comp)
  else:
    run_dir = os.path.join(workdir, 'runs', run, f'seed_{seed}',
                           'checkpoints')
    if not os.path.isdir(run_dir):
      raise app.UsageError(f'--run={run} --seed={seed}: no {run_dir}; name '
                           'a composed row the workdir ran.')
    comp, by_name = checkpoints.load_composition(run_dir)
    if sorted(by_name) != ['kv']:
      raise app.UsageError(f'{run_dir} composes {sorted(by_name)}; this '
                           'script reads one augmenting model named kv.')
    pairs = tuple(sorted(by_name['kv']))
    model = composition_lib.ComposedLM(
        anchor_cfg, (composition_lib.Augmenting('kv', aug_cfg, pairs),),
        **composition_lib.bridge_options(comp))
  params = {'anchor': anchor, 'aug_kv': aug, 'composition': comp}
  return task, model, params, tok


@dataclasses.dataclass(frozen=True)
class ComposedRowFlags:
  """--workdir, --run, --seed and --config of a script reading a composed row."""
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
