"""The benchmark scripts run and print well-formed JSON lines (no timing)."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # One CPU device, as a user would run it.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', script),
       '--config=tiny', *args], capture_output=True, text=True, timeout=300,
      env=env, cwd=ROOT)
  if proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith('{')]


class BenchmarksTest(absltest.TestCase):

  def test_train_step(self):
    lines = _run('train_step.py', '--steps=2')
    self.assertEqual([l['mode'] for l in lines], ['calm', 'full_ft', 'lora'])
    for line in lines:
      for key in ('step_s', 'tokens_per_s', 'peak_mem_mib', 'mfu',
                  'useful_gflop', 'xla_gflop'):
        self.assertGreater(line[key], 0, key)
      # The analytic FLOP count agrees with XLA's to within a third.
      self.assertBetween(line['useful_gflop'] / line['xla_gflop'], 0.67, 1.5)
    by_mode = {l['mode']: l for l in lines}
    self.assertLess(by_mode['calm']['trainable_params'],
                    by_mode['full_ft']['trainable_params'])

  def test_decode(self):
    lines = _run('decode.py', '--repeats=1')
    self.assertEqual([l['mode'] for l in lines], ['anchor', 'calm'])
    for line in lines:
      self.assertGreater(line['new_tokens_per_s'], 0)

  def test_kv_learnability(self):
    lines = _run('kv_learnability.py', '--operators=+-', '--reverse_answer')
    self.assertEqual([l['step'] for l in lines], [2, 4])
    for line in lines:
      self.assertBetween(line['exact_match'], 0.0, 100.0)
      self.assertBetween(line['token_acc'], 0.0, 1.0)
      self.assertTrue(line['reverse_answer'])

  def test_kv_readout(self):
    lines = _run('kv_readout.py', '--examples=200')
    self.assertEqual([l['layer'] for l in lines], [0, 1])
    for line in lines:
      self.assertBetween(line['compose_key_acc'], 0.0, 1.0)
      self.assertBetween(line['held_out_key_acc'], 0.0, 1.0)
      self.assertGreater(line['test_occurrences'], 0)

  def test_kv_bridge_writes(self):
    lines = _run('kv_bridge_writes.py', '--examples=16')
    # Both bridges of the tiny composition, at every kind of position each
    # split has: keys and operators in KV-MATH, digits and operators in
    # NUM-MATH.
    got = {(l['split'], tuple(l['bridge']), l['position']) for l in lines}
    self.assertEqual(got, {
        (split, bridge, kind) for bridge in ((0, -1), (1, 1))
        for split, kinds in (('kv_math_dev', ('key', 'operator')),
                             ('num_math_eval', ('digit', 'operator')))
        for kind in kinds})
    for line in lines:
      self.assertGreater(line['count'], 0)
      self.assertGreater(line['write_norm'], 0)
      self.assertGreater(line['residual_norm'], 0)
      self.assertLen(line['own_attention'], 2)
      for weight in line['own_attention']:
        self.assertBetween(weight, 0.0, 1.0)

  def test_kv_errors(self):
    lines = _run('kv_errors.py', '--examples=8', '--contexts=1')
    self.assertEqual(lines[0]['split'], 'kv_math_eval')
    self.assertEqual(lines[0]['examples'], 8)
    # Every wrong answer lands in the histogram, numeric or not.
    self.assertEqual(sum(lines[0]['error_histogram'].values()),
                     round(8 * (1 - lines[0]['exact_match'])))
    self.assertEqual([l['probe'] for l in lines[1:]],
                     ['held_out_keys', 'compose_keys'])
    for line in lines[1:]:
      # The smoke task: 200 keys, 20% compose; one context, three places.
      self.assertEqual(line['prompts'], 3 * line['keys'])
      for field in ('exact_match', 'keys_always_right', 'keys_never_right'):
        self.assertBetween(line[field], 0.0, 1.0)
      self.assertLen(line['exact_match_by_place'], 3)
    self.assertEqual((lines[1]['keys'], lines[2]['keys']), (160, 40))

  def test_kv_anchor_probe(self):
    lines = _run('kv_anchor_probe.py', '--steps=4', '--eval_every=2',
                 '--layer=-1', '--mode=overwrite', '--batch_size=8')
    self.assertEqual(lines[0]['guess'], 'operators only')
    self.assertGreater(lines[0]['dev_loss'], 0.0)
    self.assertEqual([l['step'] for l in lines[1:]], [2, 4])
    for line in lines[1:]:
      self.assertEqual((line['layer'], line['mode']), (-1, 'overwrite'))
      self.assertTrue(0.0 < line['dev_loss'] < 20.0)
      self.assertBetween(line['dev_exact_match'], 0.0, 1.0)
      self.assertGreater(line['key_write_norm'], 0.0)
      self.assertGreater(line['key_residual_norm'], 0.0)


if __name__ == '__main__':
  absltest.main()
