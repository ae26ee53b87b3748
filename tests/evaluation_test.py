"""Scoring and reporting: metrics by split, aggregation, tables, plots."""

import difflib
import functools
import inspect
import json
import os
from unittest import mock

from absl.testing import absltest
from calm_jax import data as data_lib
from calm_jax import decoding
from calm_jax import evaluation
from calm_jax import metrics
from calm_jax import sandbox
from calm_jax import sharding
from calm_jax import tasks
from calm_jax import train
from calm_jax.data import code_corpus
from calm_jax.data import pipeline
from calm_jax.data import tokenizers
import ml_collections
import numpy as np
from tests import fixtures


def _fields(targets, **extra):
  out = {'target_text': list(targets)}
  out.update({f'{k}_text': list(v) for k, v in extra.items()})
  return out


class ScoreTest(absltest.TestCase):

  def test_exact_match(self):
    got = evaluation._score('exact_match', ['12', '7', '-3'],
                            _fields(['12', '8', '-3']), None)
    self.assertAlmostEqual(got['accuracy'], 200 / 3)

  def test_chrf_is_sacrebleu_corpus_chrf(self):
    hyps, refs = ['the cat sat', 'hello word'], ['the cat sat', 'hello world']
    got = evaluation._score('chrf', hyps, _fields(refs), None)
    self.assertAlmostEqual(got['chrf'], metrics.chrf(hyps, refs))
    self.assertBetween(got['chrf'], 1.0, 99.9)

  def test_chrf_per_language_is_the_mean_of_languages(self):
    hyps = ['good morning', 'xyz', 'thank you']
    refs = ['good morning', 'abc', 'thank you']
    got = evaluation._score('chrf', hyps, _fields(refs, lang=['a', 'b', 'a']),
                            None)
    self.assertAlmostEqual(got['chrf/a'], 100.0)
    self.assertLess(got['chrf/b'], 10.0)
    self.assertAlmostEqual(got['chrf'], (got['chrf/a'] + got['chrf/b']) / 2)

  def test_pass_rate_runs_the_doctests_of_the_completed_function(self):
    pair, = code_corpus.extract_functions(
        inspect.getsource(difflib.IS_CHARACTER_JUNK))
    example = code_corpus.doc2code_example(pair, 'difflib')
    self.assertIn('>>> IS_CHARACTER_JUNK', example['tests'])
    n = 4
    fields = _fields([example['target']] * n,
                     prompt=[example['prompt']] * n,
                     tests=[example['tests']] * n, module=['difflib'] * n,
                     name=[example['name']] * n)
    completions = [example['target'],  # The true body passes,
                   '    return ch == " "',  # a wrong one fails,
                   '    return (',  # a syntax error fails,
                   '    while True: pass']  # and a hang is killed.
    got = evaluation._score('pass_rate', completions, fields,
                            {'timeout_s': 2.0, 'memory_mb': 512})
    self.assertEqual(got, {'pass_rate': 25.0, 'pass_rate_examples': 4.0})

  def test_unknown_metric(self):
    with self.assertRaisesRegex(ValueError, r"eval\.metrics\.x='bleu' is not "
                                r'a metric'):
      evaluation.check_metric('bleu', 'eval.metrics.x')


class ExactMatchFromLogitsTest(absltest.TestCase):
  """Exact match read off teacher-forced argmaxes is greedy decoding's."""

  def test_the_same_examples_match_as_when_decoding(self):
    tok = tokenizers.get_tokenizer('char:128')
    row, mesh = fixtures.random_decoder_row(
        3, vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=2,
        d_ff=64, max_len=24)
    rng = np.random.default_rng(0)
    prompts = [''.join(rng.choice(list('abcdefgh+-='), rng.integers(1, 9)))
               for _ in range(12)]
    # This random model's own greedy completions of 6 tokens: as targets
    # they match (6 = max_new_tokens, so no EOS is needed) unless changed.
    budget = 6
    ids = tok.encode
    out = decoding.generate(
        row.model, row.params, np.array(
            [[tok.bos_id] + ids(p) + [tok.pad_id] * (8 - len(p))
             for p in prompts], np.int32),
        np.array([1 + len(p) for p in prompts], np.int32),
        max_new_tokens=budget, eos_id=tok.eos_id, pad_id=tok.pad_id)
    examples = []
    for p, new in zip(prompts, np.asarray(out['new_tokens'])):
      if min(new) < tok.num_special:  # A special id: no text spells it.
        continue
      text = tok.decode(new)
      examples += [{'prompt': p, 'target': text},  # Matches.
                   {'prompt': p, 'target': text[:-1] + chr(ord(text[-1]) ^ 1)},
                   {'prompt': p, 'target': text[:-1]},  # Needs EOS next.
                   {'prompt': p, 'target': text + 'a'}]  # Past the budget.
    self.assertGreaterEqual(len(examples), 16)
    batches = pipeline.eval_batches(examples, tokenizer=tok, seq_len=16,
                                    batch_size=8)
    kw = dict(tokenizer=tok, mesh=mesh, max_new_tokens=budget)
    by_logits, by_decoding = [], []
    for b in batches:
      batch = sharding.global_batch(data_lib.model_inputs(b), mesh,
                                    whole=True)
      hits = np.asarray(tasks.nll_program(row.model, False)(row.params,
                                                           batch)[3])
      by_logits += evaluation.greedy_matches(hits, b, tok, budget)
      texts = evaluation._decode(row, b, batch, **kw)
      by_decoding += [t == r for t, r, v in zip(
          texts, b['target_text'], b['valid']) if v]
    self.assertEqual(by_logits, by_decoding)
    self.assertEqual(by_logits, [True, False, False, False] * (
        len(examples) // 4))
    # Through evaluate_row, both ways; a budget of 7 then needs the EOS.
    for budget, accuracy in ((6, 25.0), (7, 0.0)):
      kw['max_new_tokens'] = budget
      fast = evaluation.evaluate_row(row, batches, **kw)
      slow = evaluation.evaluate_row(row, batches, exact_match_decode=True,
                                     **kw)
      self.assertEqual(fast, slow)
      self.assertEqual(fast['accuracy'], accuracy)
    # The training loop's evals report it as well, from their own pass.
    task = tasks.Task(name='m', model=row.model, frozen={}, composed=False,
                      apply=tasks.model_apply(row.model, False),
                      init_trainable=None)
    ev = train.evaluate_loss(
        train.make_eval_step(task), row.params, batches, mesh,
        functools.partial(evaluation.exact_matches, row.model,
                          tokenizer=tok, max_new_tokens=6))
    self.assertEqual(ev['exact_match'], 25.0)
    self.assertAlmostEqual(ev['loss'], fast['loss'], places=5)
    self.assertNotIn('exact_match', train.evaluate_loss(
        train.make_eval_step(task), row.params, batches, mesh))

  def test_targets_that_do_not_spell_their_text_are_decoded(self):
    tok = tokenizers.get_tokenizer('byte')
    b = pipeline.eval_batches([{'prompt': 'a', 'target': 'bc'}],
                              tokenizer=tok, seq_len=8, batch_size=1)[0]
    hits = np.ones((1, 8), bool)
    self.assertEqual(evaluation.greedy_matches(hits, b, tok, 4), [True])
    self.assertEqual(evaluation.greedy_matches(hits, b, tok, 2), [True])
    self.assertEqual(evaluation.greedy_matches(hits, b, tok, 1), [False])
    b['target_text'][0] = 'bd'
    self.assertIsNone(evaluation.greedy_matches(hits, b, tok, 4))


class ValidateTest(absltest.TestCase):

  def test_code_metrics_refused_without_bubblewrap_unless_unsafe(self):
    """Without bubblewrap, a metric that runs model-written code is refused
    at validation, naming what to install and the field that opts out;
    with eval.sandbox.unsafe=True the same config validates."""

    def eval_config(metric, unsafe):
      return ml_collections.ConfigDict({
          'splits': ['code'], 'during_training_split': '', 'batch_size': 8,
          'metrics': {'code': metric}, 'sandbox': {'unsafe': unsafe},
          'max_new_tokens': 32})

    def validate(cfg):
      evaluation.validate(cfg, lambda split, field: None,
                          lambda batch, field: None)

    with mock.patch.object(sandbox, '_bwrap', return_value=None):
      sandbox.available.cache_clear()
      try:
        for metric in ('pass_rate', 'pass_at_k'):
          with self.subTest(metric):
            with self.assertRaisesRegex(
                ValueError, rf"eval\.metrics\.code='{metric}' runs "
                r'model-written code.*`bwrap` is missing.*'
                r'apt-get install bubblewrap.*eval\.sandbox\.unsafe=True'):
              validate(eval_config(metric, unsafe=False))
            validate(eval_config(metric, unsafe=True))
        # Metrics that run no code need no sandbox.
        validate(eval_config('exact_match', unsafe=False))
      finally:
        sandbox.available.cache_clear()


def _results():
  per_seed = {
      'm_B': [{'eval': {'chrf': 10.0, 'chrf/fr': 12.0, 'chrf/de': 8.0,
                        'loss': 2.0, 'examples': 4},
               'held': {'loss': 3.0, 'examples': 4}}],
      'calm': [{'eval': {'chrf': 20.0, 'chrf/fr': 25.0, 'chrf/de': 15.0,
                         'loss': 1.5, 'examples': 4},
                'held': {'loss': 2.5, 'examples': 4}},
               {'eval': {'chrf': 30.0, 'chrf/fr': 35.0, 'chrf/de': 25.0,
                         'loss': 1.0, 'examples': 4},
                'held': {'loss': 2.0, 'examples': 4}}],
  }
  return evaluation.aggregate(per_seed, ['eval', 'held'],
                              {'eval': 'chrf', 'held': 'loss'})


class ReportTest(absltest.TestCase):

  def test_aggregate_mean_std_per_seed(self):
    r = _results()
    calm = r['rows']['calm']['eval']
    self.assertAlmostEqual(calm['chrf'], 25.0)
    self.assertAlmostEqual(calm['chrf_std'], 5.0)
    self.assertEqual(calm['chrf_per_seed'], [20.0, 30.0])
    self.assertAlmostEqual(calm['chrf/fr'], 30.0)
    self.assertEqual(calm['seeds'], 2)
    self.assertEqual(r['metrics'], {'eval': 'chrf', 'held': 'loss'})

  def test_table_has_headline_and_per_group_tables(self):
    table = evaluation.format_table(_results())
    self.assertIn('| row | seeds | eval chrF | eval loss | held loss |', table)
    self.assertIn('| calm | 2 | 25.0 ± 5.0 | 1.250 | 2.250 ± 0.250 |', table)
    self.assertIn('| row | de | fr |', table)
    self.assertIn('| calm | 20.0 | 30.0 |', table)

  def test_exact_match_table_is_unchanged_by_default(self):
    r = evaluation.aggregate(
        {'m_A': [{'kv': {'accuracy': 50.0, 'loss': 1.0, 'examples': 2}}]},
        ['kv'])
    self.assertIn('| m_A | 1 | 50.0 ± 0.0 | 1.000 |',
                  evaluation.format_table(r))

  def test_a_row_in_its_own_tokenizer_is_named_and_merged(self):
    r = _results()
    r['own_tokenizer'] = {'m_B': 'ntl_bpe2048'}
    self.assertIn('m_B reads its own tokenizer (ntl_bpe2048): its losses are '
                  'per token', evaluation.format_table(r))
    self.assertNotIn('own tokenizer', evaluation.format_table(_results()))
    # Another invocation that rescored m_B in the table's tokenizer drops
    # the note; one that left m_B alone keeps it.
    rescored = evaluation.merge_results(r, _results())[0]
    self.assertNotIn('own_tokenizer', rescored)
    only_calm = _results()
    del only_calm['rows']['m_B']
    kept = evaluation.merge_results(r, only_calm)[0]
    self.assertEqual(kept['own_tokenizer'], {'m_B': 'ntl_bpe2048'})

  def test_write_results_keeps_row_order(self):
    workdir = self.create_tempdir().full_path
    evaluation.write_results(_results(), workdir)
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual(list(json.load(f)['rows']), ['m_B', 'calm'])
    for name in ('results.md', 'results.png'):
      self.assertGreater(os.path.getsize(os.path.join(workdir, name)), 0)


if __name__ == '__main__':
  absltest.main()
