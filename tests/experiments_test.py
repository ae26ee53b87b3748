"""The code and low-resource-language experiments run end to end (smoke)."""

import json
import os

from absl import flags
from absl.testing import absltest
import numpy as np

from calm_jax import train
from experiments import code as code_experiment
from experiments import ntl as ntl_experiment


def setUpModule():
  # pytest does not parse absl flags, which create_tempdir() reads.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class ExperimentsTest(absltest.TestCase):

  def _run(self, experiment, **baselines):
    config = experiment.get_config('smoke')
    config.baselines.update(baselines)
    # Decoding budget and examples scored: the smoke's, halved (every row
    # and split still runs; compile time dominates).
    config.eval.max_new_tokens //= 2
    if config.eval.num_examples:
      config.eval.num_examples = 8
    workdir = self.workdir = self.create_tempdir().full_path
    results = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual(json.load(f)['rows'].keys(), results['rows'].keys())
    for name in ('results.md', 'results.png'):
      self.assertGreater(os.path.getsize(os.path.join(workdir, name)), 0)
    self.assertEqual(list(results['rows']), list(config.rows))
    return config, results

  def _last_step(self, row):
    with open(os.path.join(self.workdir, 'runs', row, 'seed_0',
                           'history.json')) as f:
      return json.load(f)[-1]['step']

  def test_ntl_smoke(self):
    config, results = self._run(ntl_experiment, full_ft_steps=7)
    # full_ft trains for baselines.full_ft_steps, the composition for
    # train.steps.
    self.assertEqual(self._last_step('full_ft'), 7)
    self.assertEqual(self._last_step('calm'), config.train.steps)
    langs = config.data.ntl.low_resource
    for row in results['rows'].values():
      ev = row['eval']
      # The headline is the unweighted mean over the low-resource languages.
      self.assertAlmostEqual(
          ev['chrf'], sum(ev[f'chrf/{lang}'] for lang in langs) / len(langs))
      self.assertNotIn('chrf', row['mono_eval'])  # Loss only.
      self.assertGreater(row['mono_eval']['loss'], 0.0)

  def test_code_smoke(self):
    config, results = self._run(code_experiment)
    self.assertEqual(config.baselines.full_ft_split, 'code_train')
    for row in results['rows'].values():
      self.assertTrue(np.isfinite(row['code2doc_eval']['chrf']))
      self.assertEqual(row['code2doc_eval']['examples'],
                       config.eval.num_examples)
      self.assertGreater(row['code_eval']['loss'], 0.0)
    # The trained rows changed the anchor's function; the frozen ones are
    # two different models.
    loss = {name: row['doc2code_eval']['loss']
            for name, row in results['rows'].items()}
    for name in ('calm', 'full_ft', 'lora', 'm_A'):
      self.assertNotAlmostEqual(loss[name], loss['m_B'], places=5)
    self.assertGreater(results['trainable_params']['lora'], 0)
    self.assertGreater(results['trainable_params']['full_ft'],
                       results['trainable_params']['calm'])


if __name__ == '__main__':
  absltest.main()
