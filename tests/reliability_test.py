"""One writer per directory, nothing silently stale or overwritten, and one
clean line per user error."""

import io
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
from calm_jax import logs
from calm_jax import sharding
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import inputs
from calm_jax.data import kv_arithmetic
from calm_jax.data import tokenizers
from calm_jax.models import transformer
from experiments import kv_arithmetic as kv_experiment
from tests import fixtures

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
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=fixtures.ONE_DEVICE_XLA_FLAGS, JAX_PLATFORMS='cpu')
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


class WorkdirLockTest(absltest.TestCase):

  def test_a_second_main_on_a_workdir_is_refused_before_writing(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'w')
    os.makedirs(workdir)
    proc = _holder(os.path.join(workdir, locks.WORKDIR_LOCK))
    try:
      run = _run('calm_jax.main', '--config=experiments/kv_arithmetic.py:'
                 'smoke', f'--workdir={workdir}')
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    self.assertEqual(run.returncode, 1, run.stderr[-2000:])
    fatal = [l for l in run.stderr.splitlines() if l.startswith('FATAL')]
    self.assertLen(fatal, 1)
    self.assertRegex(fatal[0], rf'^FATAL --workdir: {workdir} is in use by '
                     rf'another process \(pid {proc.pid}: ')
    # The running job's files are untouched: nothing was written.
    self.assertEqual(sorted(os.listdir(workdir)), [locks.WORKDIR_LOCK])

  def test_a_launched_run_works_under_its_launchers_lock(self):
    self.assertIsNone(locks.launcher_run())
    with absltest.mock.patch.dict(os.environ,
                                  {locks.LAUNCHER_ENV: 'train_calm_seed0'}):
      self.assertEqual(locks.launcher_run(), 'train_calm_seed0')
    with absltest.mock.patch.dict(os.environ, {locks.LAUNCHER_ENV: '../x'}):
      with self.assertRaisesRegex(ValueError, 'is not a run name'):
        locks.launcher_run()


class DiskErrorsTest(absltest.TestCase):
  """A full or unwritable disk is one line naming the path and the need."""

  def _fatal_line(self, fn, where):
    stderr = absltest.mock.patch('sys.stderr', new_callable=io.StringIO)
    with stderr as err, self.assertRaises(SystemExit) as e:
      logs.run_reporting_errors(fn, where=where)
    self.assertEqual(e.exception.code, 1)
    lines = err.getvalue().splitlines()
    self.assertLen(lines, 1)
    return lines[0]

  def test_disk_full(self):
    def write_to_a_full_disk():
      with open('/dev/full', 'w') as f:  # ENOSPC on every write.
        f.write('x' * 65536)
        f.flush()
    line = self._fatal_line(write_to_a_full_disk, '/w/run')
    self.assertRegex(line, r'^FATAL --workdir: no space left on the device '
                     r'of (/w/run|/dev/full): a run needs room .*; free some,'
                     r' or point --workdir elsewhere\.$')

  def test_no_permission(self):
    def write_where_not_allowed():
      raise PermissionError(13, 'Permission denied', '/w/run/config.json')
    line = self._fatal_line(write_where_not_allowed, '/w/run')
    self.assertEqual(line, 'FATAL --workdir: cannot write '
                     '/w/run/config.json (Permission denied): a run needs '
                     'write access there; choose a --workdir this user may '
                     'write to.')

  def test_other_os_errors_keep_their_traceback(self):
    def bug():
      raise OSError(5, 'Input/output error')
    with self.assertRaises(OSError):
      logs.run_reporting_errors(bug, where='/w')


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
    # Both values, the field the user set and the fix.
    with self.assertRaisesRegex(ValueError, r"^models\.anchor\.arch: .*"
                                r"models/anchor was pretrained by an earlier "
                                r"run with another architecture "
                                r"\(models\.anchor\.arch\.d_model=48 "
                                r"against 64 cached\); use a fresh "
                                r"--workdir"):
      config_lib.check_workdir(wider, workdir)
    longer = config_lib.resolve(kv_experiment.get_config('smoke'))
    longer.models.anchor.pretrain.steps = 99
    with self.assertRaisesRegex(ValueError, r'^models\.anchor\.pretrain\.'
                                r'steps: .*pretrained by an earlier run '
                                r'with models\.anchor\.pretrain\.steps=60, '
                                r'and this config has 99'):
      config_lib.check_workdir(longer, workdir)


class ResultsMergeTest(absltest.TestCase):

  def _table(self, rows, splits=('a',), at='t0'):
    return {'rows': {r: {s: {'loss': 1.0, 'examples': 1, 'seeds': 1}
                         for s in splits} for r in rows},
            'splits': list(splits), 'metrics': {s: 'loss' for s in splits},
            'scored': {r: {'at': at, 'config_hash': 'h'} for r in rows}}

  def test_rows_of_other_invocations_are_kept(self):
    workdir = self.create_tempdir().full_path
    evaluation.write_results(self._table(['m_B', 'calm']), workdir)
    evaluation.write_results(self._table(['lora', 'calm'], at='t1'), workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      merged = json.load(f)
    self.assertEqual(list(merged['rows']), ['lora', 'calm', 'm_B'])
    self.assertEqual({k: v['at'] for k, v in merged['scored'].items()},
                     {'calm': 't1', 'lora': 't1', 'm_B': 't0'})
    with open(os.path.join(workdir, 'results.md')) as f:
      md = f.read()
    self.assertIn('| m_B |', md)
    self.assertIn('- m_B: t0, config h', md)  # Where each row comes from.
    self.assertIn('- calm: t1, config h', md)
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


class FlagValueTest(absltest.TestCase):
  """A plain flag's bad value is one line that names the flag."""

  def test_the_flag_and_its_value(self):
    script = ('from absl import app, flags\n'
              'from calm_jax import logs\n'
              "flags.DEFINE_integer('workers', 2, 'x', lower_bound=1)\n"
              "flags.DEFINE_boolean('dry_run', False, 'x')\n"
              'app.run(lambda argv: None, flags_parser=logs.parse_flags)\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('CALM_TRACEBACK', None)
    for flag, pattern in (
        ('--workers=0', r'^FATAL --workers=0: 0 is not a positive integer$'),
        ('--workers=two', r"^FATAL --workers=two: invalid literal for int"),
        ('--dry_run=yes', r'^FATAL --dry_run=yes: Non-boolean argument to '
         r'boolean flag; give true or false$')):
      with self.subTest(flag):
        proc = subprocess.run([sys.executable, '-c', script, flag], env=env,
                              capture_output=True, text=True, timeout=60,
                              check=False)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertRegex(proc.stderr.strip(), pattern)


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
        r'^FATAL --config\.train\.stepz: there is no field .stepz. in '
        r'--config\.train; did you mean --config\.train\.steps\?$')
    # No near name: the fields that are there.
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.train.zzzz=3'),
        r'^FATAL --config\.train\.zzzz: there is no field .zzzz. in '
        r'--config\.train; its fields are b1, b2, batch_size, .*steps')
    # A field below a value: there are none.
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.train.steps.x=3'),
        r'^FATAL --config\.train\.steps\.x: --config\.train\.steps is a '
        r'value of type int, not a group of fields; set it whole, e\.g\. '
        r'--config\.train\.steps=40\.$')
    # A value that is not of the field's type: absl's message names neither.
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.eval.exact_match_decode=yes'),
        r'^FATAL --config\.eval\.exact_match_decode=yes: the field is bool; '
        r'give true or false, e\.g\. --config\.eval\.exact_match_decode=False$')
    self.assertOneLine(
        _run('calm_jax.main', smoke, f'--workdir={workdir}',
             '--config.models.augmenting.kv.pairs=(1,2)'),
        r'^FATAL models\.augmenting\.kv\.pairs: \(1, 2\) must be a tuple '
        r'of \(aug_layer, anchor_layer\)')
    self.assertOneLine(
        _run('calm_jax.main', '--config=experiments/nope.py',
             f'--workdir={workdir}'),
        r"^FATAL --config: .*No such file or directory: "
        r"'experiments/nope\.py'")
    self.assertOneLine(
        _run('calm_jax.generate', '--composition=/nonexistent/run',
             '--prompt=x'), r"^FATAL --composition: '/nonexistent/run' is not")
    self.assertOneLine(
        _run('calm_jax.generate', '--anchor=/nonexistent', '--prompt=x',
             '--temperature=-1'), r'^FATAL --temperature: -1\.0 must be >= 0')
    # Every flag is checked before any model is read.
    self.assertOneLine(
        _run('calm_jax.generate', '--anchor=/nonexistent', '--prompt=x',
             '--augmenting=/some/model'),
        r"^FATAL --augmenting: '/some/model': give NAME=PATH, e.g. "
        r"--augmenting=aug=/some/model")
    self.assertOneLine(
        _run('calm_jax.generate', f'--anchor={ROOT}', '--prompt=x',
             '--tokenizer=/nonexistent/tok'),
        r"^FATAL --tokenizer: '/nonexistent/tok'\. Known tokenizers: "
        r"\['byte', 'char'\], 'char:N'")
    self.assertOneLine(
        _run('calm_jax.generate', '--anchor=/nonexistent/a', '--prompt=x'),
        r"^FATAL --anchor: '/nonexistent/a' is not a model directory")
    self.assertOneLine(
        _run('launch.local', smoke, f'--workdir={workdir}',
             '--config.train.steps=0', '--dry_run'),
        r'^FATAL train\.steps: must be a positive int, got 0')
    self.assertFalse(os.path.exists(workdir))  # Nothing was made.
    self.assertFalse(os.path.exists('/nonexistent/run'))

  def test_a_split_the_dataset_refuses_under_its_config(self):
    # NUM-DEFS examples exist only when the anchor's data has them: asking
    # to score them otherwise is one line naming the field and the fix,
    # before any data, model or workdir is made.
    workdir = os.path.join(self.create_tempdir().full_path, 'w')
    self.assertOneLine(
        _run('calm_jax.main', '--config=experiments/kv_arithmetic.py:smoke',
             f'--workdir={workdir}', "--config.eval.splits=('num_defs_eval',)"),
        r"^FATAL eval\.splits\[0\]: 'num_defs_eval' .*"
        r"data\.kv\.num_defs_in_math=0")
    self.assertFalse(os.path.exists(workdir))


if __name__ == '__main__':
  absltest.main()
