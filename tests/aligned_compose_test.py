"""Composing models that read different tokenizers, end to end.

An anchor and an augmenting checkpoint each with its own BPE (the same
size, other ids): `composition.align='auto'` aligns their token streams by
characters, the composition trains and is scored, its composition.json
records both tokenizers, and `calm_jax.generate` works from it alone. The
NTL setting's `aligned_smoke` variant trains m_A's BPE in the pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import absltest

import calm_jax
from calm_jax import checkpoints
from calm_jax import compositions
from calm_jax import train
from calm_jax.data import tokenizers
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


@absltest.skipIf(transformers is None, 'needs the test extra (transformers)')
class AlignedComposeTest(absltest.TestCase):

  def test_checkpoints_with_their_own_tokenizers(self):
    root = tempfile.mkdtemp()
    d = lambda name: os.path.join(root, name)
    tok = fixtures.train_bpe(d('tok'))
    other = fixtures.train_bpe(d('other_tok'),
                               seed_text='zebra quokka axolotl ' * 50)
    anchor = fixtures.llama(d('anchor'), tok, context=64)
    aug = fixtures.gpt2(d('aug'), other, context=64)
    # In Python: composed aligned, or refused when told not to align.
    model, _ = calm_jax.compose(anchor, {'aug': (aug, 2)})
    self.assertTrue(model.aligned)
    with self.assertRaisesRegex(ValueError, "another tokenizer than the "
                                r"anchor .*align='chars'"):
      calm_jax.compose(anchor, {'aug': (aug, 2)}, align='none')
    config = compose_experiment.get_config('smoke')
    config.models.anchor.checkpoint = anchor
    config.models.augmenting.aug.checkpoint = aug
    config.data.train = fixtures.write_jsonl(
        d('train.jsonl'), fixtures.reverse_task(120, seed=1))
    config.data.eval = fixtures.write_jsonl(
        d('eval.jsonl'), fixtures.reverse_task(8, seed=2))
    config.eval.max_new_tokens = 8
    workdir = d('W')
    results = train.train_and_evaluate(config, workdir)
    self.assertContainsSubset({'m_A', 'm_B', 'calm'}, results['rows'])
    for row in ('m_A', 'm_B', 'calm'):
      self.assertEqual(results['rows'][row]['eval']['examples'], 8)
    # The bridges learnt something of D_C through the aligned streams.
    self.assertLess(results['rows']['calm']['eval']['loss'],
                    results['rows']['m_B']['eval']['loss'])
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['composition']['align'], 'chars')
    self.assertEqual(saved['models']['augmenting']['aug']['tokenizer'], aug)

    run = os.path.join(workdir, 'runs', 'calm', 'seed_0')
    info = compositions.read(run)
    self.assertEqual(info['align'], 'chars')
    self.assertEqual(info['tokenizer']['fingerprint'],
                     tokenizers.get_tokenizer(anchor).fingerprint)
    self.assertEqual(info['augmenting'][0]['tokenizer']['fingerprint'],
                     tokenizers.get_tokenizer(aug).fingerprint)
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=fixtures.ONE_DEVICE_XLA_FLAGS)
    out = subprocess.run(
        [sys.executable, '-m', 'calm_jax.generate', f'--composition={run}',
         '--prompt=reverse: red cat =>', '--max_new_tokens=6'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertTrue(out.stdout.startswith('reverse: red cat =>'), out.stdout)

  def test_ntl_trains_its_augmenting_bpe_in_the_pipeline(self):
    config = ntl_experiment.get_config('aligned_smoke')
    config.rows = ('m_A', 'calm')
    for t in (config.models.anchor.pretrain,
              config.models.augmenting.ntl.pretrain, config.train):
      t.steps = 4
    config.data.ntl.max_messages_per_lang = 20
    config.eval.max_new_tokens = 8
    config.eval.splits = ('eval', 'mono_eval')
    del config.eval.metrics['eval_high']
    workdir = os.path.join(tempfile.mkdtemp(), 'W')
    results = train.train_and_evaluate(config, workdir)
    self.assertContainsSubset({'m_A', 'calm'}, results['rows'])
    bpe_dir = os.path.join(workdir, 'tokenizers', 'ntl_bpe512')
    tok = tokenizers.get_tokenizer(bpe_dir)
    self.assertLessEqual(tok.vocab_size, 512)
    # m_A was pretrained on its own ids, and says so.
    record = checkpoints.read_model_json(
        os.path.join(workdir, 'models', 'aug_ntl'))['tokenizer']
    self.assertEqual(record['fingerprint'], tok.fingerprint)
    # The anchor still reads bytes.
    record = checkpoints.read_model_json(
        os.path.join(workdir, 'models', 'anchor'))['tokenizer']
    self.assertEqual(record['spec'], 'byte')


if __name__ == '__main__':
  absltest.main()
