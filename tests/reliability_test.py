"""One writer per directory, nothing silently stale or overwritten, and one
clean line per user error."""

import json
import os
import signal
import subprocess
import sys

from absl import flags
from absl.testing import absltest
import flax.linen as nn
import jax

from calm_jax import checkpoints
from calm_jax import config_lib
from calm_jax import evaluation
from calm_jax import locks
from calm_jax import sharding
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import inputs
from calm_jax.data import kv_arithmetic
from calm_jax.data import tokenizers
from calm_jax.models import transformer
from experiments import kv_arithmetic as kv_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _holder(path):
  """A process that holds the lock `path` until killed."""
  code = ('import sys, time\n'
          'from calm_jax import locks\n'
          f'with locks.hold({path!r}, "x"):\n'
          '  print("held", flush=True)\n'
          '  time.sleep(60)\n')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.stdout.readline().strip() == 'held'
  return proc


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  env.pop('CALM_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


class LockTest(absltest.TestCase):

  def test_a_second_writer_is_refused_and_kill_9_releases(self):
    path = os.path.join(self.create_tempdir().full_path, 'run', '.lock')
    proc = _holder(path)
    try:
      with self.assertRaisesRegex(locks.LockedError,
                                  rf'in use by another process \(pid '
                                  rf'{proc.pid}: .*-c'):
        with locks.hold(path, 'the run'):
          pass
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    with locks.hold(path, 'the run'):  # Released by the kill.
      pass

  def test_generating_data_is_one_process_at_a_time(self):
    data_dir = self.create_tempdir().full_path
    config = kv_arithmetic.make_config(**kv_experiment.get_config(
        'smoke').data.kv.to_dict())
    builder = kv_arithmetic.KvArithmetic(config=config, data_dir=data_dir,
                                         file_format='array_record')
    parent = os.path.dirname(os.fspath(builder.data_dir))
    # What a killed run leaves: TFDS would keep it.
    os.makedirs(os.path.join(parent, 'incomplete.ABC123_1.1.0'))
    proc = _holder(os.path.join(parent, '.lock'))
    try:
      with self.assertRaisesRegex(locks.LockedError, 'generating '
                                  'kv_arithmetic'):
        kv_arithmetic.prepare(config, data_dir)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    kv_arithmetic.prepare(config, data_dir)
    self.assertEqual([n for n in os.listdir(parent)
                      if n.startswith('incomplete.')], [])


class StaleModelTest(absltest.TestCase):

  def test_a_cached_model_of_other_settings_is_refused(self):
    workdir = self.create_tempdir().full_path
    config = config_lib.resolve(kv_experiment.get_config('smoke'))
    m = config.models.anchor
    arch = transformer.DecoderConfig.from_dict(m.arch.to_dict())
    params = nn.meta.unbox(jax.jit(tasks.decoder_task('a', arch)
                                   .init_trainable)(jax.random.key(0)))
    checkpoints.save_model(
        os.path.join(workdir, 'models', 'anchor'), arch, params,
        pretrain=m.pretrain.to_dict(), seed=config.seed,
        tokenizer={'spec': 'byte', 'fingerprint': 'x', 'vocab_size': 259})
    # Its own settings, but not its tokenizer: refused too.
    with self.assertRaisesRegex(ValueError, "reads the ids of another "
                                "tokenizer than data.tokenizer='byte'"):
      config_lib.check_workdir(config, workdir)
    checkpoints.save_model(
        os.path.join(workdir, 'models', 'anchor'), arch, params,
        pretrain=m.pretrain.to_dict(), seed=config.seed,
        tokenizer=tokenizers.record(tokenizers.get_tokenizer('byte')))
    config_lib.check_workdir(config, workdir)  # All equal.
    wider = config_lib.resolve(kv_experiment.get_config('smoke'))
    wider.models.anchor.arch.d_model = 48
    with self.assertRaisesRegex(ValueError, r"models/anchor was pretrained "
                                r"by an earlier run with another "
                                r"architecture than models\.anchor\.arch "
                                r"\(they differ in \['d_model'\]\)"):
      config_lib.check_workdir(wider, workdir)
    longer = config_lib.resolve(kv_experiment.get_config('smoke'))
    longer.models.anchor.pretrain.steps = 99
    with self.assertRaisesRegex(ValueError, r'pretrained by an earlier run '
                                r'with models\.anchor\.pretrain\.steps=60, '
                                r'and this config has 99'):
      config_lib.check_workdir(longer, workdir)


class ResultsMergeTest(absltest.TestCase):

  def _table(self, rows, splits=('a',)):
    return {'rows': {r: {s: {'loss': 1.0, 'examples': 1, 'seeds': 1}
                         for s in splits} for r in rows},
            'splits': list(splits), 'metrics': {s: 'loss' for s in splits},
            'scored': {r: {'at': 't', 'config_hash': 'h'} for r in rows}}

  def test_rows_of_other_invocations_are_kept(self):
    workdir = self.create_tempdir().full_path
    evaluation.write_results(self._table(['m_B', 'calm']), workdir)
    evaluation.write_results(self._table(['lora', 'calm']), workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      merged = json.load(f)
    self.assertEqual(list(merged['rows']), ['lora', 'calm', 'm_B'])
    self.assertEqual(sorted(merged['scored']), ['calm', 'lora', 'm_B'])
    with open(os.path.join(workdir, 'results.md')) as f:
      self.assertIn('| m_B |', f.read())
    # A table of other splits does not merge: the old one is moved aside.
    evaluation.write_results(self._table(['calm'], ('b',)), workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual(list(json.load(f)['rows']), ['calm'])
    kept = [n for n in os.listdir(workdir) if n.startswith('results.2')]
    self.assertLen(kept, 1)
    with open(os.path.join(workdir, kept[0])) as f:
      self.assertEqual(list(json.load(f)['rows']), ['lora', 'calm', 'm_B'])


class HistoryTest(absltest.TestCase):

  def test_history_is_written_at_every_log_line(self):
    workdir = self.create_tempdir().full_path
    seen = []
    real = train.paths.atomic_write_text

    def spy(path, text):
      if path.endswith('history.json'):
        seen.append(len(json.loads(text)))
      return real(path, text)

    config = kv_experiment.get_config('smoke')
    arch = transformer.DecoderConfig.from_dict(
        dict(config.models.anchor.arch.to_dict(), d_model=16, d_ff=32))
    data = inputs.Data(config_lib.resolve(config).data, workdir)
    cfg = config_lib.train_config(split='num_math_train', steps=3,
                                  batch_size=4, log_every=1)
    mesh = sharding.make_mesh({'data': -1}, jax.devices()[:1])
    old, train.paths.atomic_write_text = real, spy
    try:
      train.run_training(tasks.decoder_task('h', arch), cfg,
                         run_dir=os.path.join(workdir, 'run'),
                         data=data.train('num_math_train'), mesh=mesh,
                         rules=(), seed=0)
    finally:
      train.paths.atomic_write_text = old
    self.assertEqual(seen, [1, 2, 3])  # Not only once at the end.


class OneLineErrorsTest(absltest.TestCase):

  def assertOneLine(self, proc, pattern):
    self.assertNotEqual(proc.returncode, 0)
    lines = [l for l in proc.stderr.splitlines() if l.startswith('FATAL')]
    self.assertLen(lines, 1, proc.stderr[-2000:])
    self.assertRegex(lines[0], pattern)
    self.assertNotIn('Traceback', proc.stderr)

  def test_main_generate_and_the_launcher(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'w')
    smoke = '--config=experiments/kv_arithmetic.py:smoke'
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.train.stepz=3'),
        r'^FATAL --config\.train\.stepz: there is no field .stepz. there; '
        r'did you mean --config\.train\.steps\?$')
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.models.augmenting.kv.pairs=(1,2)'),
        r'^FATAL models\.augmenting\.kv\.pairs=\(1, 2\) must be a tuple '
        r'of \(aug_layer, anchor_layer\)')
    self.assertOneLine(
        _run('calm_jax.main', '--config=experiments/nope.py',
             f'--workdir={workdir}'),
        r"^FATAL --config: .*No such file or directory: "
        r"'experiments/nope\.py'")
    self.assertOneLine(
        _run('calm_jax.generate', '--composition=/nonexistent/run',
             '--prompt=x'), r"^FATAL --composition='/nonexistent/run' is not")
    self.assertOneLine(
        _run('calm_jax.generate', '--anchor=/nonexistent', '--prompt=x',
             '--temperature=-1'), r'^FATAL --temperature=-1\.0 must be >= 0')
    self.assertOneLine(
        _run('launch.local', smoke, f'--workdir={workdir}',
             '--config.train.steps=0', '--dry_run'),
        r'^FATAL train\.steps must be a positive int, got 0')
    self.assertFalse(os.path.exists(workdir))  # Nothing was made.
    self.assertFalse(os.path.exists('/nonexistent/run'))


if __name__ == '__main__':
  absltest.main()
