"""HumanEval through the sandbox: the problems, pass@1 and pass@k."""

from absl import flags
from absl.testing import absltest

from calm_jax import evaluation
from calm_jax.data import humaneval
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
from tests import fixtures


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _fields(problems):
  return {'target_text': [p['target'] for p in problems],
          'prompt_text': [p['prompt'] for p in problems],
          'tests_text': [p['tests'] for p in problems],
          'entry_point_text': [p['entry_point'] for p in problems]}


class HumanEvalTest(absltest.TestCase):

  def test_every_canonical_solution_passes(self):
    problems = humaneval.examples()
    self.assertLen(problems, 164)
    passed = humaneval.run([p['prompt'] for p in problems],
                           [p['target'] for p in problems],
                           [p['tests'] for p in problems],
                           [p['entry_point'] for p in problems])
    failed = [p['task'] for p, ok in zip(problems, passed) if not ok]
    self.assertEqual(failed, [])  # All 164, under the sandbox's limits.

  def test_empty_wrong_and_escaping_bodies_fail(self):
    p = humaneval.examples()[0]  # has_close_elements(numbers, threshold)
    bodies = {
        'canonical': p['target'],
        'empty': '',
        'pass': '    pass\n',
        'wrong': '    return False\n',
        # Exits 0 before the tests run: the harness, not the exit status,
        # decides.
        'exit_early': '    import os; os._exit(0)\n',
        'exit_at_import': '    pass\nimport sys\nsys.exit(0)\n',
        'hang': '    while True:\n        pass\n',
    }
    passed = humaneval.run([p['prompt']] * len(bodies), list(bodies.values()),
                           [p['tests']] * len(bodies),
                           [p['entry_point']] * len(bodies),
                           sandbox_cfg={'timeout_s': 2.0})
    self.assertEqual(dict(zip(bodies, passed)),
                     {'canonical': True, **{k: False for k in bodies
                                            if k != 'canonical'}})

  def test_completions_stop_at_a_new_top_level_statement(self):
    self.assertEqual(humaneval.truncate('    return 1\ndef other():\n  x'),
                     '    return 1')
    self.assertEqual(humaneval.truncate('    return 1\n\nprint(f())'),
                     '    return 1\n')
    self.assertEqual(humaneval.truncate('    return 1\n'), '    return 1\n')

  def test_pass_at_k_is_the_unbiased_estimator(self):
    self.assertAlmostEqual(humaneval.pass_at_k(10, 3, 1), 0.3)
    # 1 - C(7, 5) / C(10, 5) = 1 - 21 / 252.
    self.assertAlmostEqual(humaneval.pass_at_k(10, 3, 5), 1 - 21 / 252)
    self.assertEqual(humaneval.pass_at_k(5, 0, 1), 0.0)
    self.assertEqual(humaneval.pass_at_k(5, 4, 2), 1.0)
    with self.assertRaisesRegex(ValueError, 'at least 3 samples'):
      humaneval.pass_at_k(2, 1, 3)

  def test_score_greedy_and_sampled(self):
    problems = humaneval.examples()[:2]
    right = [p['target'] for p in problems]
    wrong = ['    return None\n'] * 2
    got = evaluation._score('pass_at_k', [right[0], wrong[1]],
                            _fields(problems), None,
                            samples=[right, wrong, [right[0], wrong[1]]],
                            ks=(1, 2))
    self.assertEqual(got['pass@1'], 50.0)
    # Problem 0 passed 2 of 3 samples, problem 1 1 of 3.
    self.assertAlmostEqual(got['sampled_pass@1'], 100 * (2 / 3 + 1 / 3) / 2)
    self.assertAlmostEqual(got['sampled_pass@2'],
                           100 * (1.0 + (1 - 1 / 3)) / 2)
    self.assertEqual(got['samples'], 3.0)

  def test_a_model_is_scored_end_to_end(self):
    tok = tokenizers.get_tokenizer('byte')
    fit = [p for p in humaneval.examples()
           if pipeline.fits(p, tok, 256)][:2]
    batches = pipeline.eval_batches(fit, tokenizer=tok, seq_len=256,
                                    batch_size=2)
    row, mesh = fixtures.random_decoder_row(
        vocab_size=259, d_model=16, num_layers=1, num_heads=2, d_ff=16,
        max_len=264)
    got = evaluation.evaluate_row(
        row, batches, tokenizer=tok, mesh=mesh, max_new_tokens=8,
        metric='pass_at_k', sampling={'n': 2, 'k': (1, 2),
                                      'temperature': 1.0},
        sandbox={'timeout_s': 2.0})
    self.assertEqual(got['examples'], 2)
    self.assertEqual((got['pass@1'], got['sampled_pass@1'],
                      got['sampled_pass@2'], got['samples']),
                     (0.0, 0.0, 0.0, 2.0))  # A random model passes nothing.
    self.assertGreater(got['loss'], 0.0)
    with self.assertRaisesRegex(ValueError, r'eval\.sampling\.k=\(3,\)'):
      evaluation.check_sampling({'n': 2, 'k': (3,)})


if __name__ == '__main__':
  absltest.main()
