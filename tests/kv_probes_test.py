"""The KV probes (experiments/kv_probes/) run on their tiny configs and
print JSON lines whose fields agree with each other and with the task."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

from absl import flags
from absl.testing import absltest
import numpy as np

from calm_jax.data import kv_arithmetic as kv
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The task of every tiny probe but learnability's.
SMOKE = kv.SMOKE_CONFIG


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _run(probe, *args):
  """The JSON lines of `python -m experiments.kv_probes.PROBE --config=tiny`."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  # One CPU device, as a user would run it.
  env['XLA_FLAGS'] = fixtures.ONE_DEVICE_XLA_FLAGS
  proc = subprocess.run(
      [sys.executable, '-m', f'experiments.kv_probes.{probe}',
       '--config=tiny', *args], capture_output=True, text=True, timeout=300,
      env=env, cwd=ROOT)
  if proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith('{')]


def _keys(prompt):
  """The keys of a KV-MATH prompt (what lies between operators)."""
  return re.findall(r'[^-+*=]+', prompt)


class KvProbesTest(absltest.TestCase):

  def test_learnability(self):
    run_dir = self.create_tempdir().full_path
    lines = _run('learnability', '--operators=+-', '--reverse_answer',
                 f'--workdir={run_dir}')
    self.assertEqual([l['step'] for l in lines], [2, 4])
    for line in lines:
      self.assertTrue(line['reverse_answer'])
      # A percentage of whole eval examples.
      hits = line['exact_match'] * line['eval_examples'] / 100
      self.assertAlmostEqual(hits, round(hits), places=2)
    # Four steps already learn some target tokens, and the eval loss falls
    # from one eval point to the next: the second chunk resumed training.
    self.assertGreater(lines[-1]['token_acc'], 0.05)
    self.assertLess(lines[1]['eval_loss'], lines[0]['eval_loss'])
    # run_training's own record of the run: every step once, and the
    # printed loss is that of the eval step's batch.
    with open(os.path.join(run_dir, 'history.json')) as f:
      history = {h['step']: h['loss'] for h in json.load(f)}
    self.assertEqual(sorted(history), [1, 2, 3, 4])
    for line in lines:
      self.assertAlmostEqual(line['loss'], history[line['step']], delta=1e-4)

  def test_readout(self):
    lines = _run('readout', '--examples=200')
    self.assertEqual([l['layer'] for l in lines], [0, 1])
    # One occurrence per key of each prompt read.
    expected = tuple(
        sum(len(_keys(e['prompt']))
            for e in kv.generate_split(SMOKE, split)[:200])
        for split in ('kv_math_compose', 'kv_math_eval'))
    for line in lines:
      self.assertEqual(
          (line['train_occurrences'], line['test_occurrences']), expected)
    for line in lines:
      # A readout fits its own training keys far above chance, and never
      # names a held-out key's value: in the smoke task every key has its
      # own value, so none of theirs is among the labels it learnt.
      self.assertGreater(line['compose_key_acc'], 10 * line['chance'])
      self.assertEqual(line['held_out_key_acc'], 0.0)

  def test_probes_read_only_kv_math_of_a_mixed_d_c(self):
    # The default's D_C mixes in the anchor's NUM-MATH (numerals where the
    # keys would be): readout and anchor_probe read keys, so they take its
    # KV-MATH examples only, all of them.
    from experiments.kv_probes import workdir  # pylint: disable=g-import-not-at-top
    mixed = dataclasses.replace(SMOKE, num_math_in_compose=100)
    every = kv.generate_split(mixed, 'kv_math_compose')
    self.assertLen(every, mixed.num_kv_math_compose + 100)
    got = workdir.kv_math_examples(mixed, 'kv_math_compose')
    self.assertEqual(got, [e for e in every if e['task'] == 'kv_math'])
    self.assertLen(got, mixed.num_kv_math_compose)
    # The same KV-MATH examples as the unmixed D_C (shuffled with the rest).
    key = lambda e: (e['prompt'], e['target'])
    self.assertEqual(sorted(got, key=key), sorted(
        kv.generate_split(SMOKE, 'kv_math_compose'), key=key))

  def test_bridge_writes(self):
    lines = _run('bridge_writes', '--examples=16')
    # Both bridges of the tiny composition, at every kind of position each
    # split has: keys and operators in KV-MATH, digits and operators in
    # NUM-MATH.
    got = {(l['split'], tuple(l['bridge']), l['position']) for l in lines}
    self.assertEqual(got, {
        (split, bridge, kind) for bridge in ((0, -1), (1, 1))
        for split, kinds in (('kv_math_dev', ('key', 'operator')),
                             ('num_math_eval', ('digit', 'operator')))
        for kind in kinds})
    # Every key letter, operator and digit of the prompts, for each bridge.
    counts = {}
    for split in ('kv_math_dev', 'num_math_eval'):
      prompts = [e['prompt'] for e in kv.generate_split(SMOKE, split)[:16]]
      ops = sum(sum(c in '+-*' for c in p) for p in prompts)
      counts[split, 'operator'] = ops
      counts[split, 'key'] = sum(len(''.join(_keys(p))) for p in prompts)
      counts[split, 'digit'] = sum(sum(c.isdigit() for c in p)
                                   for p in prompts)
    for line in lines:
      self.assertEqual(line['count'], counts[line['split'],
                                             line['position']], line)
      self.assertGreater(line['write_norm'], 0)
      self.assertLen(line['own_attention'], 2)
      # The recency bias starts sharpest in head 0 (slope 1, head 1: 1/64),
      # which so reads m_A at its own position the most.
      self.assertGreater(line['own_attention'][0], line['own_attention'][1])
      if line['bridge'] == [0, -1]:
        # Into the embeddings, drawn with std d_model ** -0.5: norm ~1.
        self.assertBetween(line['residual_norm'], 0.8, 1.2)
      else:
        self.assertGreater(line['residual_norm'], 1.2)

  def test_errors(self):
    lines = _run('errors', '--examples=8', '--contexts=1')
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
      self.assertLen(line['exact_match_by_place'], 3)
      # Every place holds as many prompts, and a key right in every
      # context is right in some.
      self.assertAlmostEqual(line['exact_match'],
                             np.mean(line['exact_match_by_place']), places=3)
      self.assertLessEqual(line['keys_always_right'], line['exact_match'])
      self.assertLessEqual(line['exact_match'],
                           1 - line['keys_never_right'] + 1e-4)
    self.assertEqual((lines[1]['keys'], lines[2]['keys']), (160, 40))

  def test_anchor_probe(self):
    lines = _run('anchor_probe', '--steps=4', '--eval_every=2',
                 '--layer=-1', '--mode=overwrite', '--batch_size=8')
    self.assertEqual(lines[0]['guess'], 'operators only')
    # Knowing the operators beats a uniform guess over the 12 symbols of
    # an answer (digits, '-' and its end).
    self.assertBetween(lines[0]['dev_loss'], 0.0, math.log(12))
    self.assertEqual([l['step'] for l in lines[1:]], [2, 4])
    for line in lines[1:]:
      self.assertEqual((line['layer'], line['mode']), (-1, 'overwrite'))
      self.assertGreater(line['dev_loss'], 0.0)
      # A fraction of the smoke task's dev examples.
      hits = line['dev_exact_match'] * SMOKE.num_eval
      self.assertAlmostEqual(hits, round(hits), places=2)
      # Layer -1: the writes land on the embeddings (norm ~1, see above).
      self.assertBetween(line['key_residual_norm'], 0.8, 1.2)
    # E starts at zero and grows as it trains.
    self.assertGreater(lines[1]['key_write_norm'], 0.0)
    self.assertGreater(lines[2]['key_write_norm'], lines[1]['key_write_norm'])


if __name__ == '__main__':
  absltest.main()
