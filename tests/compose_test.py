"""Composing real checkpoints on your own data, end to end.

Two tiny Hugging Face checkpoints of different families (a Llama anchor, a
GPT-2 augmenting model) share a BPE tokenizer trained here; the data is a
JSONL file of prompt/completion pairs. Covers `experiments/compose.py`
through `calm_jax.main`, `generate` from the composition directory alone,
the public API, and the refusals that come before any compute.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

import calm_jax
from calm_jax import compositions
from calm_jax import config_lib
from calm_jax import data as data_lib
from calm_jax import decoding
from calm_jax import train
from calm_jax.data import tokenizers
from experiments import code as code_experiment
from experiments import compose as compose_experiment
from experiments import ntl as ntl_experiment
from tests import fixtures

try:
  import torch  # pylint: disable=unused-import
  import transformers  # pylint: disable=unused-import
except ImportError:  # The test extra is not installed.
  transformers = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=fixtures.ONE_DEVICE_XLA_FLAGS)
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


@absltest.skipIf(transformers is None, 'needs the test extra (transformers)')
class ComposeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    d = lambda name: os.path.join(cls.root, name)
    cls.tok = fixtures.train_bpe(d('tokenizer'))
    cls.anchor = fixtures.llama(d('anchor'), cls.tok, context=64)
    cls.aug = fixtures.gpt2(d('aug'), cls.tok, context=64)
    cls.train_file = fixtures.write_jsonl(d('train.jsonl'),
                                          fixtures.reverse_task(120, seed=1))
    cls.eval_file = fixtures.write_jsonl(d('eval.jsonl'),
                                         fixtures.reverse_task(8, seed=2))

  def config(self, variant='smoke'):
    config = compose_experiment.get_config(variant)
    config.models.anchor.checkpoint = self.anchor
    config.models.augmenting.aug.checkpoint = self.aug
    config.data.train = self.train_file
    config.data.eval = self.eval_file
    return config

  def test_the_compose_command_then_generate_from_its_directory(self):
    workdir = os.path.join(tempfile.mkdtemp(), 'W')
    # The command of the issue and the README, as it stands, but for 100
    # of its 500 steps (the bridges have learnt enough by then; the rest
    # would be a third of this test's time).
    out = _run('calm_jax.main', '--config=experiments/compose.py',
               f'--workdir={workdir}',
               f'--config.models.anchor.checkpoint={self.anchor}',
               f'--config.models.augmenting.aug.checkpoint={self.aug}',
               f'--config.data.train={self.train_file}',
               f'--config.data.eval={self.eval_file}',
               '--config.train.steps=100')
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    # Quiet logs at the default verbosity: the phases and the table's
    # progress, none of the libraries' routine lines.
    log = out.stdout + out.stderr
    for phase in ('[data] jsonl', '[models] anchor', '[table] run 1/'):
      self.assertIn(phase, log)
    for noise in ('orbax', 'Downloading and preparing', 'libtpu',
                  'tensorflow_datasets'):
      self.assertNotIn(noise, log)
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    self.assertContainsSubset({'m_B', 'calm'}, results['rows'])
    # When and under which config each row was scored.
    self.assertEqual(sorted(results['scored']), sorted(results['rows']))
    for row in ('m_B', 'calm'):
      ev = results['rows'][row]['eval']
      self.assertEqual(ev['examples'], 8)
      self.assertGreater(ev['loss'], 0.0)
      self.assertIn('accuracy', ev)  # Exact match, %.
    # The bridges learnt something of D_C: CALM's eval loss is below m_B's.
    self.assertLess(results['rows']['calm']['eval']['loss'],
                    results['rows']['m_B']['eval']['loss'])

    # The run's data ids are the tokenizer's own.
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['data']['tokenizer'], self.anchor)
    self.assertEqual(saved['data']['seq_len'], 64)  # The models' context.
    tok = tokenizers.get_tokenizer(self.anchor)
    data = data_lib.Data(config_lib.resolve(self.config()).data, workdir)
    batch = next(data.train('train').iterator(4, seed=0))
    seg = batch['segment_ids'][0]
    ids = batch['inputs'][0][seg == 1].tolist()
    texts = [json.loads(line) for line in open(self.train_file)]
    self.assertIn(ids, [[tok.bos_id] + tok.encode(t['prompt'] +
                                                  t['completion'])
                        for t in texts])

    # The composition describes itself ...
    run = os.path.join(workdir, 'runs', 'calm', 'seed_0')
    info = compositions.read(run)
    self.assertEqual(info['anchor']['path'], self.anchor)
    self.assertEqual(info['augmenting'][0]['name'], 'aug')
    self.assertEqual(info['augmenting'][0]['pairs'], [[3, 3]])
    self.assertEqual(info['tokenizer']['fingerprint'], tok.fingerprint)
    # The workdir or the row's directory instead of a run: the runs below.
    for above in (workdir, os.path.dirname(run)):
      with self.assertRaisesRegex(
          ValueError, r"holds no composition\.json; the runs below it: "
          + re.escape(run) + r'\.$'):
        calm_jax.load_composition(above)
    # ... so generate needs no other flag, and decodes what the trained
    # model decodes in process.
    prompt = 'reverse: red cat =>'
    out = _run('calm_jax.generate', f'--composition={run}',
               f'--prompt={prompt}', '--max_new_tokens=6')
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    model, params = calm_jax.load_composition(run)
    ids = [tok.bos_id] + tok.encode(prompt)
    new = list(decoding.stream(model, params, ids, max_new_tokens=6,
                               eos_id=tok.eos_id,
                               model_kwargs={'prompt_len': np.array(
                                   [len(ids)], np.int32)}))
    self.assertEqual(out.stdout.rstrip('\n'), prompt + tok.decode(new))
    # Another model than the recorded one is refused.
    out = _run('calm_jax.generate', f'--composition={run}',
               f'--anchor={self.aug}', f'--prompt={prompt}')
    self.assertNotEqual(out.returncode, 0)
    self.assertIn('is not the anchor this composition was trained with',
                  out.stderr)

  def test_api_compose_starts_as_the_anchor(self):
    model, params = calm_jax.compose(self.anchor, {'aug': (self.aug, 4)})
    self.assertEqual(model.augmenting[0].pairs, ((3, 3),))
    anchor, anchor_params = calm_jax.load_pretrained(self.anchor)
    tokens = jnp.array([[1, 40, 41, 42, 43, 44]])
    np.testing.assert_allclose(
        model.apply({'params': params}, tokens),
        anchor.apply({'params': anchor_params}, tokens), atol=1e-5)
    tok = calm_jax.load_tokenizer(self.anchor)
    self.assertEqual(tok.fingerprint,
                     tokenizers.get_tokenizer(self.tok).fingerprint)
    with self.assertRaisesRegex(ValueError, 'must be \\(model, pairs\\)'):
      calm_jax.compose(self.anchor, {'aug': self.aug})
    # Errors name the API's own arguments, not the config's fields.
    for kw, pattern in ((dict(bridge='nope'), r"^bridge='nope' is not a "),
                        (dict(cross_heads=-1), r'^cross_heads=-1 must be'),
                        (dict(bridge='ours', recency_bias='x'),
                         r"^options\.recency_bias='x' must be a bool")):
      with self.assertRaisesRegex(ValueError, pattern):
        calm_jax.compose(self.anchor, {'aug': (self.aug, 4)}, **kw)

  def test_refused_before_any_compute(self):
    root = tempfile.mkdtemp()
    # Another tokenizer of the same size: equal vocabulary sizes pass a
    # size check, but the ids mean other things.
    other_tok = fixtures.train_bpe(os.path.join(root, 'other_tok'),
                                   seed_text='zebra quokka axolotl ' * 50)
    self.assertEqual(fixtures.vocab_size(other_tok),
                     fixtures.vocab_size(self.tok))
    other_aug = fixtures.gpt2(os.path.join(root, 'other_aug'), other_tok,
                              context=64)
    no_tok = os.path.join(root, 'no_tok')
    shutil.copytree(self.aug, no_tok)
    os.remove(os.path.join(no_tok, 'tokenizer.json'))
    small = fixtures.gpt2(os.path.join(root, 'small'), self.tok, vocab=200,
                          context=64)
    padded = fixtures.gpt2(os.path.join(root, 'padded'), self.tok, vocab=384,
                           context=64)
    cases = [
        # Its own tokenizer is not the anchor's: aligned by default
        # (composition.align='auto'), refused when told not to align.
        ('aug', other_aug, {'composition.align': 'none'},
         r"models\.augmenting\.aug\.tokenizer=.*other_aug.* is not "
         r"data\.tokenizer=.*320 and 320 tokens.* set "
         r"composition\.align='chars'"),
        ('aug', other_aug, {'data.tokenizer': self.tok,
                            'models.augmenting.aug.tokenizer': self.tok},
         r"models\.augmenting\.aug\.checkpoint=.*other_aug' reads the ids of "
         r'another tokenizer than data\.tokenizer=.*320 and 320 tokens.* '
         r'set data\.tokenizer='),
        ('aug', no_tok, {},
         r'models\.augmenting\.aug\.checkpoint=.*no_tok\' holds no tokenizer'),
        ('aug', small, {},
         r'models\.augmenting\.aug\.checkpoint: the embedding table has 200 '
         r'rows, fewer than the ids of models\.augmenting\.aug\.tokenizer='
         r'.* \(320\)'),
        ('aug', self.aug, {'data.tokenizer': 'byte'},
         r"models\.anchor\.checkpoint=.*anchor' reads the ids of another "
         r"tokenizer than data\.tokenizer='byte'"),
        ('aug', self.aug, {'rows': ('m_B', 'calm_vanilla_aug')},
         r"'calm_vanilla_aug'.*set models\.augmenting\.aug\.vanilla_checkpoint"),
        ('aug', self.aug, {'data.eval': '', 'data.eval_fraction': 0.0},
         r'data\.eval_fraction=0\.0'),
    ]
    for _, aug, overrides, pattern in cases:
      with self.subTest(pattern):
        config = self.config()
        config.models.augmenting.aug.checkpoint = aug
        for key, value in overrides.items():
          node = config
          *parents, leaf = key.split('.')
          for p in parents:
            node = node[p]
          node[leaf] = value
        workdir = os.path.join(root, 'never_made')
        with self.assertRaisesRegex(ValueError, pattern):
          train.train_and_evaluate(config, workdir)
        self.assertFalse(os.path.exists(workdir))  # Nothing ran.
    # A table padded past the vocabulary is fine.
    config = self.config()
    config.models.augmenting.aug.checkpoint = padded
    train.validate(config)

  def test_code_and_ntl_take_the_same_checkpoint_fields(self):
    for experiment, name in ((code_experiment, 'code'),
                             (ntl_experiment, 'ntl')):
      config = experiment.get_config('smoke')
      config.models.anchor.checkpoint = self.anchor
      config.models.augmenting[name].checkpoint = self.aug
      config.data.seq_len = 64
      config.rows = ('m_A', 'm_B', 'calm', 'lora', 'full_ft',
                     'calm_random_aug')
      train.validate(config)
      resolved = config_lib.resolve(config)
      self.assertEqual(resolved.data.tokenizer, self.anchor)
    # And code.py runs on them: its corpus is read with their tokenizer.
    root = self.create_tempdir().full_path
    config = code_experiment.get_config('smoke')
    config.models.anchor.checkpoint = fixtures.llama(
        os.path.join(root, 'anchor'), self.tok, context=128)
    config.models.augmenting.code.checkpoint = fixtures.gpt2(
        os.path.join(root, 'aug'), self.tok, context=128)
    config.rows = ('m_B', 'calm')
    config.train.steps = 2
    config.eval.num_examples = 4
    config.eval.max_new_tokens = 4
    workdir = self.create_tempdir().full_path
    results = train.train_and_evaluate(config, workdir)
    self.assertEqual(list(results['rows']), ['m_B', 'calm'])
    info = compositions.read(os.path.join(workdir, 'runs', 'calm', 'seed_0'))
    self.assertEqual(info['tokenizer']['spec'],
                     config.models.anchor.checkpoint)
    self.assertEqual(info['max_len'], 128)


if __name__ == '__main__':
  absltest.main()
