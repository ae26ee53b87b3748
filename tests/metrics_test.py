"""Tests for calm_jax.metrics."""

from absl.testing import absltest
import sacrebleu

from calm_jax import metrics

HYPS = ['the cat sat on the mat', 'Bonjour le monde', 'Save changes']
REFS = ['the cat is on the mat', 'Hello world', 'Save the changes']


class ChrfTest(absltest.TestCase):

  def test_identical_is_100(self):
    self.assertAlmostEqual(metrics.chrf(REFS, REFS), 100.0)

  def test_disjoint_is_zero(self):
    self.assertAlmostEqual(metrics.chrf(['aaaa bbbb'], ['xyz qrs']), 0.0)

  def test_matches_sacrebleu(self):
    expected = sacrebleu.corpus_chrf(HYPS, [REFS]).score
    got = metrics.chrf(HYPS, REFS)
    self.assertAlmostEqual(got, expected, places=6)
    self.assertGreater(got, 10.0)
    self.assertLess(got, 90.0)

  def test_corpus_level_not_sentence_mean(self):
    sentence_mean = sum(
        sacrebleu.sentence_chrf(h, [r]).score
        for h, r in zip(HYPS, REFS)) / len(HYPS)
    self.assertNotAlmostEqual(metrics.chrf(HYPS, REFS), sentence_mean,
                              places=3)

  def test_empty_and_length_mismatch(self):
    self.assertEqual(metrics.chrf([], []), 0.0)
    with self.assertRaisesRegex(ValueError, '2 hypotheses but 1 references'):
      metrics.chrf(['a', 'b'], ['a'])


class ExactMatchTest(absltest.TestCase):

  def test_percent(self):
    self.assertEqual(metrics.exact_match(['a', 'b', 'c', 'd'],
                                         ['a', 'x', 'c', 'D']), 50.0)
    self.assertEqual(metrics.exact_match(REFS, REFS), 100.0)

  def test_empty(self):
    self.assertEqual(metrics.exact_match([], []), 0.0)


class GroupedTest(absltest.TestCase):

  def test_per_group_and_unweighted_mean(self):
    hyps = ['a', 'b', 'c', 'x']
    refs = ['a', 'b', 'c', 'd']
    groups = ['fr', 'fr', 'fr', 'cy']
    scores = metrics.grouped(metrics.exact_match, hyps, refs, groups)
    # Unweighted: (100 + 0) / 2, not 3 of 4 = 75.
    self.assertEqual(scores, {'cy': 0.0, 'fr': 100.0, 'mean': 50.0})

  def test_chrf_groups_match_separate_calls(self):
    groups = ['a', 'b', 'a']
    scores = metrics.grouped(metrics.chrf, HYPS, REFS, groups)
    self.assertAlmostEqual(
        scores['a'], metrics.chrf([HYPS[0], HYPS[2]], [REFS[0], REFS[2]]))
    self.assertAlmostEqual(scores['b'], metrics.chrf([HYPS[1]], [REFS[1]]))
    self.assertAlmostEqual(scores['mean'], (scores['a'] + scores['b']) / 2)

  def test_empty_and_errors(self):
    self.assertEqual(metrics.grouped(metrics.chrf, [], [], []), {'mean': 0.0})
    with self.assertRaisesRegex(ValueError, '1 groups but 2 hypotheses'):
      metrics.grouped(metrics.chrf, ['a', 'b'], ['a', 'b'], ['x'])
    with self.assertRaisesRegex(ValueError, "named 'mean'"):
      metrics.grouped(metrics.chrf, ['a'], ['a'], ['mean'])


if __name__ == '__main__':
  absltest.main()
