"""Bad input fails before any compute, with a message naming field and fix."""

import os
import subprocess
import sys

from absl.testing import absltest
import jax
import numpy as np

from calm_jax import checkpoints
from calm_jax import tasks
from calm_jax import train
from calm_jax.models import transformer
from experiments import kv_arithmetic


def smoke():
  return kv_arithmetic.get_config('smoke')


class ValidateTest(absltest.TestCase):

  def assertInvalid(self, config, pattern, exc=ValueError, devices=None):
    with self.assertRaisesRegex(exc, pattern):
      train.validate(config, devices)

  def test_smoke_and_default_configs_are_valid(self):
    train.validate(smoke())
    single = kv_arithmetic.get_config('single_token')
    train.validate(single)
    self.assertEqual(single.models.augmenting.kv.pairs,
                     ((0, -1), (1, -1), (2, -1), (3, -1)))
    mixed = kv_arithmetic.get_config('single_token_mixed')
    train.validate(mixed)
    self.assertEqual(single.data.kv.num_math_in_compose, 0)
    self.assertEqual(mixed.data.kv.num_math_in_compose, 5000)
    self.assertEqual(mixed.train.steps, 16000)
    self.assertEqual(mixed.composition.to_dict(),
                     single.composition.to_dict())

  def test_default_is_the_headline_and_full_has_every_row(self):
    default = kv_arithmetic.get_config('')
    full = kv_arithmetic.get_config('full')
    single = kv_arithmetic.get_config('single_token')
    for config in (default, full):
      train.validate(config)
      self.assertEqual(config.composition.bridge, 'ours')
      self.assertTrue(config.composition.ours.anchor_gate)
      self.assertEqual(config.data.kv.num_math_in_compose, 5000)
      self.assertEqual(config.data.kv.key_max_len, 1)
      self.assertEqual(config.models.augmenting.kv.pairs,
                       single.models.augmenting.kv.pairs)
      # The cheaper recipe: the bridges' MLP at the anchor's width, scored
      # on every held-out example; single_token keeps what its results
      # were found with.
      self.assertEqual(config.composition.ours.proj_hidden,
                       config.models.anchor.arch.d_model)
      self.assertEqual(config.eval.num_examples, 0)
    self.assertEqual(single.composition.ours.proj_hidden,
                     4 * single.models.anchor.arch.d_model)
    self.assertEqual(single.train.learning_rate, 3e-3)
    # The default table: the rows the targets are about, one seed.
    self.assertEqual(default.rows, ('m_A', 'm_B', 'calm', 'calm_random_aug',
                                    'calm_paper', 'lora'))
    self.assertEqual(default.seeds, (0,))
    self.assertLen(full.rows, 12)
    self.assertEqual(full.seeds, (0, 1, 2))
    self.assertEqual(full.train.to_dict(), default.train.to_dict())
    # The paper's own setting, scaled down, is a named variant.
    letters = kv_arithmetic.get_config('letters')
    train.validate(letters)
    self.assertEqual(letters.composition.bridge, 'paper')
    self.assertEqual((letters.data.kv.key_min_len,
                      letters.data.kv.key_max_len), (2, 6))
    self.assertEqual(letters.data.kv.num_math_in_compose, 0)

  def test_generalist_is_the_default_with_a_copying_anchor(self):
    default = kv_arithmetic.get_config('')
    generalist = kv_arithmetic.get_config('generalist')
    train.validate(generalist)
    self.assertEqual(generalist.data.kv.subs_prompt_end, ':')
    self.assertGreater(generalist.data.kv.num_copy_in_math, 0)
    self.assertIn('num_copy_eval', generalist.eval.splits)
    # Only the data and the anchor's pretraining differ: same bridge, same
    # D_C size and composition training, but for the weight decay its
    # results were measured with (the default's moved to 0.1 after).
    self.assertEqual((generalist.train.weight_decay,
                      default.train.weight_decay), (0.01, 0.1))
    self.assertEqual(generalist.composition.to_dict(),
                     default.composition.to_dict())
    self.assertEqual(dict(generalist.train.to_dict(), weight_decay=None),
                     dict(default.train.to_dict(), weight_decay=None))
    self.assertEqual((generalist.rows, generalist.seeds),
                     (default.rows, default.seeds))

  def test_generalist_subs_and_value_tokens_change_only_their_fields(self):
    default = kv_arithmetic.get_config('')
    generalist = kv_arithmetic.get_config('generalist')
    subs = kv_arithmetic.get_config('generalist_subs')
    tokens = kv_arithmetic.get_config('value_tokens')
    for config in (subs, tokens):
      train.validate(config)
    self.assertEqual((subs.data.kv.num_kv_subs_in_compose,
                      subs.data.kv.num_copy_in_compose), (1000, 1000))
    self.assertEqual(subs.composition.to_dict(),
                     generalist.composition.to_dict())
    self.assertEqual(subs.models.to_dict(), generalist.models.to_dict())
    self.assertGreaterEqual(len(tokens.data.kv.value_alphabet),
                            tokens.data.kv.max_value)
    self.assertEqual(tokens.composition.to_dict(),
                     default.composition.to_dict())
    self.assertEqual(tokens.train.steps, default.train.steps)
    self.assertEqual(tokens.models.anchor.arch.vocab_size, 1283)
    # value_tokens_defs: only the anchor's data and pretraining differ.
    defs = kv_arithmetic.get_config('value_tokens_defs')
    train.validate(defs)
    self.assertEqual({k: v for k, v in defs.data.kv.items()
                      if k != 'num_defs_in_math'},
                     {k: v for k, v in tokens.data.kv.items()
                      if k != 'num_defs_in_math'})
    self.assertGreater(defs.data.kv.num_defs_in_math, 0)
    self.assertEqual(defs.composition.to_dict(), tokens.composition.to_dict())
    self.assertEqual(defs.train.steps, 2 * tokens.train.steps)
    self.assertEqual(dict(defs.train.to_dict(), steps=0),
                     dict(tokens.train.to_dict(), steps=0))
    self.assertEqual(defs.models.augmenting.to_dict(),
                     tokens.models.augmenting.to_dict())
    self.assertEqual(defs.models.anchor.arch.to_dict(),
                     tokens.models.anchor.arch.to_dict())
    self.assertIn('num_defs_eval', defs.eval.splits)

  def test_negative_profile_steps(self):
    c = smoke()
    c.train.profile_steps = -3
    self.assertInvalid(c, r'train\.profile_steps=-3 must be an int >= 0')

  def test_loop_intervals(self):
    # `done % log_every` divides by it; 0 checkpoints would save every step.
    for field, value, least in (('log_every', 0, 1), ('log_every', -1, 1),
                                ('eval_every', -5, 0),
                                ('checkpoint_every', 0, 1),
                                ('keep_checkpoints', 0, 1)):
      with self.subTest(field=field, value=value):
        c = smoke()
        c.train[field] = value
        self.assertInvalid(
            c, rf'train\.{field}={value!r} must be an int >= {least}')
    c = smoke()
    c.models.anchor.pretrain.log_every = 0
    self.assertInvalid(
        c, r'models\.anchor\.pretrain\.log_every=0 must be an int >= 1')

  def test_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, r"variant 'large'.*smoke"):
      kv_arithmetic.get_config('large')

  def test_layer_index_out_of_range(self):
    c = smoke()
    c.models.augmenting.kv.pairs = ((1, 9),)
    self.assertInvalid(c, r'models\.augmenting\.kv\.pairs: anchor layer 9 is '
                       r'out of range.*0\.\.3')
    c.models.augmenting.kv.pairs = ((4, 0),)
    self.assertInvalid(c, r'augmenting layer 4 is out of range')

  def test_k_that_yields_no_pair(self):
    c = smoke()
    c.models.augmenting.kv.every_k = 5
    self.assertInvalid(c, r'models\.augmenting\.kv\.every_k=5 yields no '
                       r'layer pair.*every_k <= 4')

  def test_a_table_padded_past_the_vocabulary_is_fine(self):
    c = smoke()
    c.models.anchor.arch.vocab_size = 384  # 259 byte ids, padded.
    train.validate(c)

  def test_vocab_smaller_than_tokenizer(self):
    c = smoke()
    c.models.anchor.arch.vocab_size = 100
    c.models.augmenting.kv.arch.vocab_size = 100
    self.assertInvalid(c, r'models\.anchor\.arch: the embedding table has '
                       r"100 rows, fewer than the ids of data\.tokenizer="
                       r"'byte' \(259\); set models\.anchor\.arch\.vocab_size "
                       r'to at least 259')

  def test_frozen_dtype_auto_is_bfloat16_on_accelerators_only(self):
    self.assertEqual(train.config_lib.frozen_dtype_for('tpu'), 'bfloat16')
    self.assertEqual(train.config_lib.frozen_dtype_for('gpu'), 'bfloat16')
    self.assertEqual(train.config_lib.frozen_dtype_for('cpu'), 'float32')
    c = smoke()
    self.assertEqual(c.frozen_dtype, 'auto')
    self.assertEqual(train.validate(c).frozen_dtype, 'float32')  # This CPU.
    c.frozen_dtype = 'fp8'
    self.assertInvalid(c, r"frozen_dtype='fp8' is not one of .*'auto'")
    c = smoke()
    c.attention = 'flash'
    self.assertInvalid(c, r"attention='flash' is not an attention kernel")

  def test_missing_checkpoint(self):
    c = smoke()
    c.models.anchor.checkpoint = '/nonexistent/anchor'
    self.assertInvalid(c, r"models\.anchor\.checkpoint: no model directory "
                       r"at '/nonexistent/anchor'", FileNotFoundError)

  def test_corrupted_model_file(self):
    path = self.create_tempdir().full_path
    with open(os.path.join(path, 'model.json'), 'w') as f:
      f.write('{"arch": {"vocab_')
    c = smoke()
    c.models.augmenting.kv.checkpoint = path
    self.assertInvalid(c, r'models\.augmenting\.kv\.checkpoint: .*model\.json'
                       r".* is missing or corrupted")

  def test_corrupted_model_params(self):
    path = os.path.join(self.create_tempdir().full_path, 'm')
    arch = transformer.DecoderConfig(vocab_size=259, d_model=16, num_layers=1,
                                     num_heads=2, d_ff=16, max_len=64)
    params = tasks.decoder_task('m', arch).init_trainable(jax.random.key(0))
    import flax.linen as nn
    checkpoints.save_model(path, arch, nn.meta.unbox(params))
    loaded_arch, loaded = checkpoints.load_model(path, 'x.checkpoint')
    self.assertEqual(loaded_arch, arch)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           nn.meta.unbox(params), loaded)
    for root, _, files in os.walk(os.path.join(path, 'params')):
      for name in files:
        os.remove(os.path.join(root, name))
    with self.assertRaisesRegex(ValueError, r'x\.checkpoint: the parameters '
                                r'in .* are missing or corrupted.*Re-export'):
      checkpoints.load_model(path, 'x.checkpoint')
    # The same damage to a model this workdir pretrained (checkpoint '') is
    # fixed by deleting it, not by setting the field to what it already is.
    workdir = self.create_tempdir().full_path
    os.makedirs(os.path.join(workdir, 'models'))
    os.rename(path, os.path.join(workdir, 'models', 'anchor'))
    c = train.validate(smoke())
    c.models.anchor.arch = arch.to_dict()
    with self.assertRaisesRegex(
        ValueError, r'models\.anchor\.checkpoint: the parameters in .* are '
        r'missing or corrupted.*pretrained here by an earlier run: delete '
        r'.*models/anchor and rerun') as e:
      train.frozen_model('anchor', 'models.anchor', c.models.anchor,
                         workdir=workdir, data=None,
                         mesh=train.config_lib.make_mesh(c),
                         rules=train.sharding.logical_rules(()), seed=0)
    self.assertNotIn("to ''", str(e.exception))

  def test_batch_size_not_divisible_by_devices(self):
    c = smoke()
    c.train.batch_size = 12
    n = jax.device_count()
    if n == 1:
      self.skipTest('needs several devices (tests/conftest.py forces 8)')
    self.assertInvalid(c, rf'train\.batch_size=12 is not divisible by the '
                       rf'{n} data-parallel devices')
    c = smoke()
    c.models.anchor.pretrain.batch_size = 3
    self.assertInvalid(c, r'models\.anchor\.pretrain\.batch_size=3')

  def test_mesh_that_does_not_fit(self):
    c = smoke()
    c.mesh.tensor = 3
    self.assertInvalid(c, r'mesh\.tensor')

  def test_unknown_dataset_and_split(self):
    c = smoke()
    c.data.dataset = 'imagenet'
    self.assertInvalid(c, r"data\.dataset='imagenet'\. Known datasets: "
                       r"\['code_corpus', 'jsonl', 'kv_arithmetic', "
                       r"'ntl_catalogs', 'text', 'tfds'\]")
    c = smoke()
    c.train.split = 'kv_math_train'
    self.assertInvalid(c, r"train\.split='kv_math_train' is not a split.*"
                       r'kv_math_compose')
    c = smoke()
    c.eval.splits = ('kv_subs_eval', 'nope')
    self.assertInvalid(c, r"eval\.splits\[1\]='nope'")

  def test_full_ft_steps(self):
    c = smoke()
    c.baselines.full_ft_steps = -1  # (ConfigDict itself rejects a float.)
    self.assertInvalid(c, r'baselines\.full_ft_steps=-1 must be an integer '
                       r'>= 0 \(0 = train\.steps\)')

  def test_bridges_by_name_and_their_options(self):
    c = smoke()
    c.composition.bridge = 'flamingo'
    self.assertInvalid(c, r"composition\.bridge='flamingo' is not a bridge; "
                       r"choose one of \['ours', 'paper'\]")
    c = smoke()
    c.composition.ours.proj_hidden = 64  # With the paper's bridge:
    self.assertInvalid(c, r"composition\.ours\.proj_hidden=64 is read only "
                       r"by composition\.bridge='ours', not by 'paper'")
    c.composition.bridge = 'ours'
    train.validate(c)
    for field, bad, pattern in (
        ('recency_max_slope', 0.0, r'recency_max_slope=0\.0 must be > 0'),
        ('proj_hidden', -1, r'proj_hidden=-1 must be >= 0'),
        ('anchor_queries', False, r'composition\.ours\.anchor_queries=False '
         r'needs composition\.ours\.recency_bias=True')):
      c = smoke()
      c.composition.bridge = 'ours'
      c.composition.ours[field] = bad
      self.assertInvalid(c, pattern)
    c.composition.ours.recency_bias = True
    train.validate(c)

  def test_write_penalty(self):
    c = smoke()
    c.composition.write_penalty = -0.1
    self.assertInvalid(c, r'composition\.write_penalty=-0\.1 must be a '
                       r'number >= 0')
    c.composition.write_penalty = 0.5
    train.validate(c)

  def test_unknown_tokenizer_and_arch_field(self):
    c = smoke()
    c.data.tokenizer = 'sentencepiece'
    self.assertInvalid(c, r'data\.tokenizer')
    c = smoke()
    c.models.anchor.arch.norm = 'batchnorm'
    self.assertInvalid(c, r"models\.anchor\.arch\.norm: unknown value "
                       r"'batchnorm'")

  def test_seq_len_too_short(self):
    c = smoke()
    c.data.seq_len = 20
    self.assertInvalid(c, r'data\.seq_len=20 is too short')

  def test_per_run_seq_len(self):
    c = smoke()
    c.models.anchor.pretrain.seq_len = 999
    self.assertInvalid(c, r'models\.anchor\.pretrain\.seq_len=999 must be 0 '
                       r'\(use data\.seq_len\) or an int in \[2, '
                       r'data\.seq_len=64\]')
    c = smoke()
    c.train.seq_len = 32
    train.validate(c)

  def test_typo_in_override_is_an_error(self):
    workdir = self.create_tempdir().full_path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, '-m', 'calm_jax.main',
         '--config=experiments/kv_arithmetic.py:smoke',
         f'--workdir={workdir}', '--config.train.stpes=3'],
        cwd=root, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=root))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('stpes', proc.stderr)
    self.assertEmpty(os.listdir(workdir))

  def test_errors_come_before_any_compute(self):
    workdir = self.create_tempdir().full_path
    c = smoke()
    c.models.augmenting.kv.every_k = 5
    with self.assertRaisesRegex(ValueError, 'every_k=5'):
      train.train_and_evaluate(c, workdir)
    self.assertEmpty(os.listdir(workdir))


if __name__ == '__main__':
  absltest.main()
