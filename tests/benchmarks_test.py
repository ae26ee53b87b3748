"""The benchmark scripts run and print well-formed JSON lines (no timing).

The KV research probes are tested in kv_probes_test.py.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest

from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, sizes='--config=tiny'):
  env = dict(os.environ, PYTHONPATH=ROOT)
  # One CPU device, as a user would run it.
  env['XLA_FLAGS'] = fixtures.ONE_DEVICE_XLA_FLAGS
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', script),
       *([sizes] if sizes else []), *args], capture_output=True, text=True, timeout=300,
      env=env, cwd=ROOT)
  if proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith('{')]


class BenchmarksTest(absltest.TestCase):

  def test_train_step(self):
    # One run for every mode, its matmuls also timed alone.
    lines = _run('train_step.py', '--steps=1', '--dots_alone')
    self.assertEqual([l['mode'] for l in lines], ['calm', 'full_ft', 'lora'])
    for line in lines:
      for key in ('step_s', 'tokens_per_s', 'peak_mem_mib', 'mfu',
                  'useful_gflop', 'xla_gflop', 'dots_alone_s'):
        self.assertGreater(line[key], 0, key)
      # The analytic FLOP count agrees with XLA's to within a third.
      self.assertBetween(line['useful_gflop'] / line['xla_gflop'], 0.67, 1.5)
      self.assertBetween(line['dot_bound_mfu'], 0, 100)
      # The step's dots do at least the useful matmul work, and not much
      # more than all of XLA's count (which also counts the elementwise ops).
      self.assertGreaterEqual(line['dot_gflop'], 0.95 * line['useful_gflop'])
      self.assertLessEqual(line['dot_gflop'], 1.05 * line['xla_gflop'])
    by_mode = {l['mode']: l for l in lines}
    self.assertLess(by_mode['calm']['trainable_params'],
                    by_mode['full_ft']['trainable_params'])
    # A full fine-tune's backward makes weight gradients everywhere.
    self.assertGreater(by_mode['full_ft']['dots'], by_mode['calm']['dots'])

  def test_explicit_pairs_cached_augmenting_and_the_profile(self):
    trace_dir = self.create_tempdir().full_path
    plain, profile = _run('train_step.py', '--steps=1', '--modes=calm',
                          '--pairs=0:1,1:2,3:3', f'--profile_dir={trace_dir}')
    cached, = _run('train_step.py', '--steps=1', '--modes=calm',
                   '--pairs=0:1,1:2,3:3', '--cache_augmenting')
    self.assertEqual(plain['pairs'], [[0, 1], [1, 2], [3, 3]])
    self.assertTrue(cached['cache_augmenting'])
    # Cached, the step skips m_A's forward, in the count and in XLA's.
    self.assertLess(cached['useful_gflop'], plain['useful_gflop'])
    self.assertLess(cached['xla_gflop'], plain['xla_gflop'])
    for line in (plain, cached):
      self.assertBetween(line['useful_gflop'] / line['xla_gflop'], 0.9, 1.1)
    with self.assertRaisesRegex(AssertionError, r'--pairs: augmenting layer '
                                r'9 is out of range'):
      _run('train_step.py', '--steps=1', '--modes=calm', '--pairs=9:1')
    # The profile says where the time goes.
    self.assertIn('retain_freed_memory', plain)
    prof = profile['op_profile']
    self.assertGreater(prof['wall_ms'], 0)
    self.assertGreater(prof['busy_ms'], 0)
    self.assertNotEmpty(prof['threads_ms'])
    # Ops by kind add up to at most the busy time; the slowest ops carry
    # the jax op they came from.
    self.assertLessEqual(sum(prof['kinds_ms'].values()),
                         prof['busy_ms'] + 0.01 * len(prof['kinds_ms']))
    self.assertGreater(prof['top_ops_ms'][0][1], 0)
    self.assertTrue(any('jit(train_step)' in origin
                        for _, _, origin in prof['top_ops_ms']),
                    prof['top_ops_ms'])

  def test_the_accelerator_shapes(self):
    # benchmarks/gpu.sh's sizes are the issue's ~1B anchor and ~250M m_A
    # (counted from the parameter shapes; nothing is allocated).
    line, = _run('train_step.py', '--params_only', sizes='--config=1b')
    self.assertBetween(line['anchor_params'], 0.9e9, 1.1e9)
    self.assertBetween(line['aug_params'], 0.2e9, 0.3e9)
    self.assertEqual(line['pairs'], [[3, 3], [7, 8], [11, 13], [15, 17]])
    # The scripts' flags are the ones gpu.sh passes.
    script = open(os.path.join(ROOT, 'benchmarks', 'gpu.sh')).read()
    self.assertIn('--config=1b --frozen_dtype=bfloat16', script)
    self.assertIn('--dtype=bfloat16', script)
    self.assertEqual(subprocess.run(['bash', '-n', os.path.join(
        ROOT, 'benchmarks', 'gpu.sh')]).returncode, 0)

  def test_versus_calm_pytorch(self):
    # Both frameworks on the same pairs, in one run, and the ratio.
    lines = _run('versus_peer.py', '--rounds=1', '--steps=1',
                 '--rows=spread,paper', '--threads=1')
    self.assertEqual([l['row'] for l in lines], ['spread', 'paper'])
    spread, paper = lines
    self.assertEqual(spread['pairs'], '0:0,1:1,2:2,3:3')
    self.assertEqual(paper['pairs'], '3:3')
    for line in lines:
      self.assertGreater(line['ratio_tokens_per_s'], 0)
      self.assertLen(line['calm_jax_step_s'], 1)
      self.assertLen(line['calm_pytorch_step_s'], 1)
    self.assertGreater(spread['calm_over_full_ft'], 0)
    self.assertGreater(spread['ratio_cached_tokens_per_s'], 0)
    # The spread row also times its matmuls alone; the paper row does not.
    self.assertGreater(spread['calm_step_over_dots_alone'], 0)
    self.assertGreater(spread['full_ft_dot_bound_mfu'], 0)
    self.assertNotIn('calm_dots_alone_s', paper)

  def test_plan(self):
    env_free = lambda *a: _run('plan.py', *a, sizes='')
    line, = env_free('--anchor=gemma-7b', '--augmenting=gemma-2b',
                     '--mesh=v5e-64', '--batch=128', '--remat')
    self.assertEqual(line['mesh_axes'], {'data': 1, 'fsdp': 64, 'tensor': 1})
    gib = line['gib_per_device']
    # gemma-7b + gemma-2b is ~11B parameters: in bf16 over 64 devices,
    # about 21.5 GB / 64 = 0.32 GiB each (embeddings included).
    self.assertBetween(gib['frozen_weights'], 0.25, 0.4)
    self.assertAlmostEqual(gib['optimizer'], 2 * gib['bridges'], delta=0.002)
    self.assertEqual(line['pairs'], [[3, 6], [7, 13], [11, 20], [15, 27]])
    self.assertTrue(line['fits'])
    # Against XLA's own accounting of the compiled step at small sizes.
    check, = env_free('--check')
    self.assertBetween(check['weights_ratio'], 0.9, 1.1)
    self.assertBetween(check['activations_ratio'], 0.25, 2.0)

  def test_decode(self):
    lines = _run('decode.py', '--repeats=1', '--transformers')
    self.assertEqual([l['mode'] for l in lines],
                     ['anchor', 'calm', 'calm_prompt_only', 'anchor_llama',
                      'transformers_llama'])
    for line in lines:
      self.assertGreater(line['new_tokens_per_s'], 0)
    # Every model but the anchor is compared with it call by call.
    self.assertNotIn('vs_anchor_paired', lines[0])
    for line in lines[1:]:
      self.assertGreater(line['vs_anchor_paired'], 0)
    # XLA's costs of one decode step: the composition's holds the anchor's
    # and m_A's, so its bounds are below 1; the Llama anchor differs.
    anchor, calm, prompt_only = lines[:3]
    self.assertGreater(calm['step_gflop'], anchor['step_gflop'])
    self.assertGreater(calm['step_mb'], anchor['step_mb'])
    for key in ('vs_anchor_flop_bound', 'vs_anchor_bytes_bound'):
      self.assertBetween(calm[key], 0.3, 0.99)
      # Past the prompt the prompt-only step runs the bridges, not m_A.
      self.assertBetween(prompt_only[key], calm[key], 0.99)
    self.assertNotIn('step_gflop', lines[4])  # transformers: no XLA.


if __name__ == '__main__':
  absltest.main()
