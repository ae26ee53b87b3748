"""The launch scripts and how calm_jax.distributed reads their env.

Nothing here starts a cluster: the pod and SLURM scripts print their
commands, the SLURM job script runs against stub `scontrol`/`srun`/`python3`,
and `distributed.plan` is pure. `local.py` runs a small table for real.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

from absl.testing import absltest

from calm_jax import distributed
from calm_jax import provenance

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO_ROOT, 'launch', 'tpu_pod.sh')
SLURM = os.path.join(REPO_ROOT, 'launch', 'slurm_gpu.sh')
LOCAL = os.path.join(REPO_ROOT, 'launch', 'local.py')


def _run(script: str, *args: str, env: dict[str, str] | None = None,
         cwd: str = REPO_ROOT) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', script, *args], cwd=cwd,
                        capture_output=True, text=True, timeout=30,
                        env=dict(os.environ, **(env or {})))


class TpuPodTest(absltest.TestCase):

  ARGS = ('--tpu=calm-v4-32', '--zone=us-central2-b',
          '--config=experiments/kv_arithmetic.py:smoke',
          '--workdir=gs://bucket/runs/r1')

  def test_dry_run_prints_the_command(self):
    for mode in (['--dry-run'], []):
      env = {} if mode else {'DRY_RUN': '1'}
      r = _run(TPU, *self.ARGS, '--project=p1', *mode, '--',
               '--config.train.steps=7', env=env)
      self.assertEqual(r.returncode, 0, r.stderr)
      out = r.stdout
      self.assertStartsWith(out, 'gcloud compute tpus tpu-vm ssh calm-v4-32 ')
      for part in ('--zone=us-central2-b', '--worker=all', '--project=p1',
                   'cd ~/calm_jax && python3 -m calm_jax.main',
                   '--config=experiments/kv_arithmetic.py:smoke',
                   '--workdir=gs://bucket/runs/r1', '--config.train.steps=7'):
        self.assertIn(part, out)

  def test_worker_subset(self):
    r = _run(TPU, *self.ARGS, '--worker=0,1', '--dry-run')
    self.assertEqual(r.returncode, 0, r.stderr)
    self.assertIn('--worker=0,1', r.stdout)

  def test_bad_args_fail_clearly(self):
    cases = [
        ((*self.ARGS[:3],), '--workdir=gs://BUCKET/DIR is required'),
        ((*self.ARGS[:3], '--workdir=/tmp/run'),
         "--workdir='/tmp/run' must be a gs:// path"),
        (self.ARGS[1:], '--tpu=NAME is required'),
        ((*self.ARGS, '--worker=two'),
         "--worker='two' must be 'all' or worker indices"),
        ((*self.ARGS, '--steps=3'), "unknown argument '--steps=3'"),
    ]
    for args, message in cases:
      with self.subTest(message=message):
        r = _run(TPU, *args, '--dry-run')
        self.assertEqual(r.returncode, 2)
        self.assertIn('tpu_pod.sh: error: ' + message, r.stderr)
        self.assertEqual(r.stdout, '')


class SlurmGpuTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.config = os.path.join(self.tmp, 'my config.py')
    with open(self.config, 'w') as f:
      f.write('def get_config(arg=None): ...\n')

  def dry_run(self, *extra: str) -> str:
    r = _run(SLURM, '--nodes=2', '--gpus_per_node=8',
             f'--config={self.config}:smoke', '--workdir=/shared/runs/r1',
             '--partition=gpu', '--time=01:00:00', '--dry-run', *extra)
    self.assertEqual(r.returncode, 0, r.stderr)
    return r.stdout

  def test_dry_run_prints_the_command(self):
    out = self.dry_run('--', '--config.train.steps=7')
    sbatch = out.splitlines()[0]
    self.assertStartsWith(sbatch, 'sbatch ')
    for part in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8',
                 '--partition=gpu', '--time=01:00:00',
                 f'--chdir={REPO_ROOT}'):
      self.assertIn(part, sbatch)
    for part in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES="$SLURM_NNODES"',
                 'JAX_PROCESS_ID=$SLURM_PROCID', 'srun', 'calm_jax.main',
                 '--workdir=/shared/runs/r1', '--config.train.steps=7'):
      self.assertIn(part, out)

  def test_job_script_sets_each_tasks_env(self):
    """Runs the printed job script with stub SLURM tools and python."""
    out = self.dry_run('--', '--config.train.steps=7')
    job = out.split('<<JOB\n', 1)[1].rsplit('JOB\n', 1)[0]
    bin_dir = os.path.join(self.tmp, 'bin')
    os.mkdir(bin_dir)
    stubs = {
        'scontrol': 'printf "gpu-node-3\\ngpu-node-4\\n"',
        # Drop srun's options, then run the command once per node.
        'srun': textwrap.dedent('''\
            while [[ "$1" == --* ]]; do shift; done
            for ((i = 0; i < SLURM_NNODES; i++)); do
              SLURM_PROCID=$i "$@"
            done'''),
        'python3': textwrap.dedent('''\
            echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID"
            printf '%s|' "$@"; echo'''),
    }
    for name, body in stubs.items():
      path = os.path.join(bin_dir, name)
      with open(path, 'w') as f:
        f.write('#!/usr/bin/env bash\n' + body + '\n')
      os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
               SLURM_JOB_ID='4097', SLURM_JOB_NODELIST='gpu-node-[3-4]',
               SLURM_NNODES='2')
    r = subprocess.run(['bash', '-c', job], capture_output=True, text=True,
                       env=env, timeout=30, cwd=self.tmp)
    self.assertEqual(r.returncode, 0, r.stderr)
    lines = r.stdout.splitlines()
    port = 61440 + 4097 % 4096
    args = (f'-m|calm_jax.main|--config={self.config}:smoke|'
            '--workdir=/shared/runs/r1|--config.train.steps=7|')
    self.assertEqual(lines, [f'gpu-node-3:{port} 2 0', args,
                             f'gpu-node-3:{port} 2 1', args])
    # calm_jax.distributed turns exactly this env into an explicit start.
    reason, kwargs = distributed.plan(env={
        'JAX_COORDINATOR_ADDRESS': f'gpu-node-3:{port}',
        'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1', 'SLURM_STEP_ID': '0',
        'SLURM_NTASKS': '2'}, on_tpu_vm=False)
    self.assertEqual(reason, 'explicit')
    self.assertEqual(kwargs['process_id'], 1)
    self.assertEqual(kwargs['cluster_detection_method'], 'deactivate')

  def test_bad_args_fail_clearly(self):
    good = {'nodes': '--nodes=2', 'gpus': '--gpus_per_node=8',
            'config': f'--config={self.config}', 'workdir': '--workdir=/w'}
    cases = [
        (dict(good, nodes='--nodes=0'),
         "--nodes='0' must be a positive integer"),
        (dict(good, nodes='--nodes=two'), "--nodes='two' must be a positive"),
        (dict(good, gpus=''), "--gpus_per_node='' must be a positive integer"),
        (dict(good, config='--config=nope.py:smoke'),
         "--config: file 'nope.py' not found"),
        (dict(good, workdir=''), '--workdir=DIR is required'),
        (dict(good, workdir='--steps=3'), "unknown argument '--steps=3'"),
    ]
    for args, message in cases:
      with self.subTest(message=message):
        r = _run(SLURM, *[a for a in args.values() if a], '--dry-run')
        self.assertEqual(r.returncode, 2)
        self.assertIn('slurm_gpu.sh: error: ' + message, r.stderr)
        self.assertEqual(r.stdout, '')

  def test_must_run_from_repo_root(self):
    r = _run(SLURM, '--nodes=1', '--gpus_per_node=1',
             f'--config={self.config}', '--workdir=/w', '--dry-run',
             cwd=self.tmp)
    self.assertEqual(r.returncode, 2)
    self.assertIn('run from the repository root', r.stderr)


class DistributedPlanTest(absltest.TestCase):

  def test_single_process_is_a_no_op(self):
    self.assertEqual(distributed.plan(env={}, on_tpu_vm=False),
                     ('single process', None))
    # A one-task SLURM step, or the batch script itself, is one process.
    self.assertIsNone(distributed.plan(
        env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '4'}, on_tpu_vm=False)[1])
    self.assertIsNone(distributed.plan(
        'h:1', 1, 0, env={}, on_tpu_vm=False)[1])

  def test_explicit_args_win_over_env(self):
    env = {'JAX_COORDINATOR_ADDRESS': 'env:1', 'JAX_NUM_PROCESSES': '4',
           'JAX_PROCESS_ID': '3'}
    reason, kwargs = distributed.plan('host:1234', None, 0, env=env,
                                      on_tpu_vm=False)
    self.assertEqual(reason, 'explicit')
    self.assertEqual(kwargs, dict(
        coordinator_address='host:1234', num_processes=4, process_id=0,
        local_device_ids=None, cluster_detection_method='deactivate'))

  def test_cluster_auto_detection(self):
    slurm = {'SLURM_JOB_ID': '1', 'SLURM_STEP_ID': '0', 'SLURM_NTASKS': '2'}
    reason, kwargs = distributed.plan(env=slurm, on_tpu_vm=False)
    self.assertEqual(reason, 'SLURM')
    self.assertNotIn('cluster_detection_method', kwargs)
    reason, kwargs = distributed.plan(env={}, on_tpu_vm=True)
    self.assertEqual(reason, 'Cloud TPU')
    self.assertEqual(set(kwargs.values()), {None})

  def test_bad_settings_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, r'--num_processes \(or '
                                r'\$JAX_NUM_PROCESSES\), --process_id'):
      distributed.plan('host:1', env={}, on_tpu_vm=False)
    with self.assertRaisesRegex(ValueError, r"JAX_PROCESS_ID='x' must be an "
                                'integer'):
      distributed.plan(env={'JAX_PROCESS_ID': 'x'}, on_tpu_vm=False)
    with self.assertRaisesRegex(ValueError, r'--process_id=2 must be in '
                                r'\[0, JAX_NUM_PROCESSES=2\)'):
      distributed.plan('h:1', None, 2, env={'JAX_NUM_PROCESSES': '2'},
                       on_tpu_vm=False)


class CodeVersionsTest(absltest.TestCase):

  def test_runs_that_imported_different_code_are_told_apart(self):
    logs = self.create_tempdir().full_path
    for name, git, diff in (('prepare', 'abc', ''),
                            ('train_calm_seed0', 'abc', ''),
                            ('train_calm_seed1', 'abc+dirty', '0123456789ab')):
      with open(os.path.join(logs, f'{name}.run.json'), 'w') as f:
        json.dump({'git': git, 'diff': diff}, f)
    versions = provenance.code_versions(
        logs, ['prepare', 'train_calm_seed0', 'train_calm_seed1', 'score'])
    self.assertEqual(versions, {'prepare': 'abc', 'train_calm_seed0': 'abc',
                                'train_calm_seed1': 'abc+dirty/0123456789ab'})
    digest = provenance.diff_digest()
    self.assertRegex(digest, r'^([0-9a-f]{12})?$')
    self.assertEqual(bool(digest), provenance.git_revision().endswith(
        '+dirty'))


class LocalTest(absltest.TestCase):
  """launch/local.py: one workdir, several processes on this machine."""

  def _local(self, *args: str, timeout: float = 30
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LOCAL, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          check=False)

  def test_dry_run_plans_three_phases(self):
    r = self._local(
        '--dry_run', '--config=experiments/kv_arithmetic.py:smoke',
        '--workdir=/tmp/r1', '--config.train.steps', '7',
        "--config.rows=('m_A','calm','calm_vanilla_aug','lora')",
        '--config.seeds=(0,1)')
    self.assertEqual(r.returncode, 0, r.stderr)
    lines = r.stdout.splitlines()
    names = [line[2:] for line in lines if line.startswith('# ')]
    # The row that pretrains its own m_A keeps its seeds in one run.
    self.assertEqual(names, ['prepare', 'train_calm_vanilla_aug',
                             'train_calm_seed0', 'train_calm_seed1',
                             'train_lora_seed0', 'train_lora_seed1', 'score'])
    commands = dict(zip(names, lines[1::2]))
    for name, rows, seeds in (
        ('prepare', '("m_A",)', '(0,)'),
        ('train_calm_vanilla_aug', '("calm_vanilla_aug",)', '(0,1)'),
        ('train_lora_seed1', '("lora",)', '(1,)'),
        ('score', '("m_A","calm","calm_vanilla_aug","lora")', '(0,1)')):
      with self.subTest(name):
        cmd = commands[name]
        self.assertIn('-m calm_jax.main '
                      '--config=experiments/kv_arithmetic.py:smoke '
                      '--config.train.steps 7 --workdir=/tmp/r1 ', cmd)
        self.assertIn(f"'--config.rows={rows}'", cmd)
        self.assertIn(f"'--config.seeds={seeds}'", cmd)
        # The user's rows and seeds are replaced, not passed twice.
        self.assertEqual(cmd.count('--config.rows'), 1)
        self.assertEqual(cmd.count('--config.seeds'), 1)

  def test_runs_a_table_and_scores_without_retraining(self):
    workdir = self.create_tempdir().full_path
    r = self._local(
        '--workers=2', '--config=experiments/kv_arithmetic.py:smoke',
        f'--workdir={workdir}', '--config.train.steps=6',
        '--config.train.eval_every=3', '--config.eval.num_examples=8',
        '--config.eval.max_new_tokens=8',
        '--config.models.anchor.pretrain.steps=8',
        '--config.models.augmenting.kv.pretrain.steps=8',
        "--config.rows=('m_A','calm')", '--config.seeds=(0,1)', timeout=600)
    self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    # (How rows are split into runs, calm_vanilla_aug's seeds in one run
    # among them, is the dry run's test above.)
    self.assertEqual(list(results['rows']), ['m_A', 'calm'])
    self.assertEqual(results['rows']['calm']['kv_math_eval']['seeds'], 2)
    names = ['prepare', 'score', 'train_calm_seed0', 'train_calm_seed1']
    logs = sorted(os.listdir(os.path.join(workdir, 'logs')))
    # Each run records its own config beside its log, under the launcher's
    # workdir lock; the workdir's config.json is the whole table's.
    self.assertEqual(logs, sorted(f'{n}.{ext}' for n in names
                                  for ext in ('log', 'config.json',
                                              'run.json')))
    with open(os.path.join(workdir, 'config.json')) as f:
      self.assertEqual(json.load(f)['rows'], ['m_A', 'calm'])
    with open(os.path.join(workdir, 'logs', 'train_calm_seed1.config.json')
              ) as f:
      self.assertEqual(json.load(f)['seeds'], [1])
    # Every row says when it was scored, under one config (rows and seeds
    # aside).
    self.assertEqual(sorted(results['scored']), sorted(results['rows']))
    self.assertLen({v['config_hash'] for v in results['scored'].values()}, 1)
    with open(os.path.join(workdir, 'logs', 'score.log')) as f:
      score = f.read()
    # Every run was finished by phase 2: phase 3 only resumed and scored.
    self.assertEqual(score.count('resuming at step 6/6'), 2)
    self.assertNotIn('s/step', score)
    self.assertIn('total:', r.stdout)
    self.assertIn('[table] 2/2 runs trained', r.stdout)

  def test_bad_config_fails_before_any_run(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'w')
    r = self._local(
        '--config=experiments/kv_arithmetic.py:smoke', f'--workdir={workdir}',
        "--config.rows=('m_A','calm_n7')")
    self.assertNotEqual(r.returncode, 0)
    self.assertIn("rows[1]='calm_n7' is not a known row", r.stderr)
    self.assertEqual(r.stdout, '')
    self.assertFalse(os.path.exists(workdir))

  def test_a_failed_run_stops_before_scoring(self):
    workdir = self.create_tempdir().full_path
    r = self._local(
        '--config=experiments/kv_arithmetic.py:smoke', f'--workdir={workdir}',
        "--config.rows=('m_A','calm')", '--config.seeds=(0,)',
        '--python=false')
    self.assertNotEqual(r.returncode, 0)
    self.assertIn("phase 'prepare' failed", r.stderr)
    self.assertNotIn('score', r.stdout)


if __name__ == '__main__':
  absltest.main()
