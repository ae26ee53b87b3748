"""Hugging Face checkpoints load with logits and greedy generations that
match `transformers` (PyTorch, CPU). Tiny random models are built and saved
by the tests; nothing is downloaded."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import calm_jax
from calm_jax import decoding
from calm_jax import hf_import

try:
  import torch
  import transformers
except ImportError:  # The test extra is not installed.
  torch = transformers = None

VOCAB = 128
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    'llama_gqa': ('LlamaConfig', 'LlamaForCausalLM', LLAMA),
    'llama3_rope_scaling': ('LlamaConfig', 'LlamaForCausalLM', dict(
        LLAMA, rope_theta=500000.0, rope_scaling={
            'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
            'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})),
    'mistral': ('MistralConfig', 'MistralForCausalLM', LLAMA),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', LLAMA),
    'gemma': ('GemmaConfig', 'GemmaForCausalLM', dict(
        LLAMA, num_key_value_heads=1, head_dim=32)),
    # Sliding window 8 < the 24-token test sequences.
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM', dict(
        LLAMA, num_hidden_layers=4, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM', dict(
        LLAMA, num_hidden_layers=4, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=16, layer_types=[
            'sliding_attention', 'sliding_attention', 'sliding_attention',
            'full_attention'])),
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2)),
}


def _save(case, **save_kw):
  cfg_name, model_name, kw = CASES[case]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_name)(**kw)
  model = getattr(transformers, model_name)(cfg).eval()
  path = tempfile.mkdtemp()
  model.save_pretrained(path, safe_serialization=True, **save_kw)
  return model, path


@absltest.skipIf(torch is None, 'needs the test extra (torch, transformers)')
class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(c, c) for c in CASES])
  def test_logits_and_greedy_generation(self, case):
    ref_model, path = _save(case)
    model, params = calm_jax.load_pretrained(path)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
    with torch.no_grad():
      ref = ref_model(torch.tensor(tokens)).logits.float().numpy()
    out = np.asarray(jax.jit(model.apply)({'params': params}, tokens))
    self.assertEqual(out.shape, (2, 24, VOCAB))
    self.assertLessEqual(float(np.abs(out - ref).max()), 1e-4)

    prompt = tokens[:, :6]
    with torch.no_grad():
      ref_gen = ref_model.generate(
          torch.tensor(prompt), attention_mask=torch.ones_like(
              torch.tensor(prompt)), max_new_tokens=10, do_sample=False,
          eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    ours = decoding.generate(model, params, prompt,
                             np.full((2,), 6, np.int32), max_new_tokens=10,
                             eos_id=-1)
    np.testing.assert_array_equal(np.asarray(ours['new_tokens']), ref_gen)

  def test_sharded_index_and_bfloat16(self):
    ref_model, path = _save('llama_gqa', max_shard_size='20KB')
    self.assertTrue(os.path.exists(
        os.path.join(path, 'model.safetensors.index.json')))
    _, params32 = calm_jax.load_pretrained(path)
    model, params = calm_jax.load_pretrained(path, dtype='bfloat16')
    for leaf in jax.tree_util.tree_leaves(params):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    tokens = np.arange(16)[None] % VOCAB
    a = jax.jit(model.apply)({'params': params}, tokens)
    with torch.no_grad():
      ref = ref_model(torch.tensor(tokens)).logits.float().numpy()
    self.assertLess(float(np.abs(np.asarray(a) - ref).max()), 0.1)

  def test_errors(self):
    _, path = _save('llama_gqa')
    with open(os.path.join(path, 'config.json')) as f:
      cfg = json.load(f)
    cfg['model_type'] = 'mamba'
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(cfg, f)
    with self.assertRaisesRegex(ValueError, r"model_type='mamba' is not "
                                r'supported'):
      calm_jax.load_pretrained(path)
    with self.assertRaisesRegex(ValueError, r'config\.json is missing'):
      calm_jax.load_pretrained(tempfile.mkdtemp())
    _, a = hf_import.read_config(_save('gpt2')[1])
    _, b = hf_import.read_config(_save('gemma')[1])
    b = b.__class__(**dict(b.to_dict(), vocab_size=256))
    with self.assertRaisesRegex(ValueError, r'anchor has 128, code has 256'):
      hf_import.check_same_vocab({'anchor': a, 'code': b})

  def test_experiment_composes_hf_checkpoints(self):
    from calm_jax import train
    from experiments import kv_arithmetic
    torch.manual_seed(0)
    paths = {}
    for role, cfg in (
        ('anchor', transformers.LlamaConfig(**dict(
            LLAMA, vocab_size=259, num_hidden_layers=4))),
        ('aug', transformers.GPT2Config(vocab_size=259, n_embd=32, n_layer=4,
                                        n_head=2, n_positions=64))):
      model = (transformers.LlamaForCausalLM if role == 'anchor'
               else transformers.GPT2LMHeadModel)(cfg)
      paths[role] = tempfile.mkdtemp()
      model.save_pretrained(paths[role], safe_serialization=True)
    config = kv_arithmetic.get_config('smoke')
    config.models.anchor.checkpoint = paths['anchor']
    config.models.augmenting.kv.checkpoint = paths['aug']
    config.rows = ('m_B', 'calm')
    config.train.steps = 3
    config.eval.num_examples = 8
    config.eval.batch_size = 8
    config.train.batch_size = 8
    results = train.train_and_evaluate(config, self.create_tempdir().full_path)
    self.assertEqual(sorted(results['rows']), ['calm', 'm_B'])
    # The composition was trained on top of the loaded Llama anchor.
    self.assertGreater(results['trainable_params']['calm'], 0)

  def test_tokenizer_json(self):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, 'a': 3, 'b': 4, 'ab': 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<pad>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tempfile.mkdtemp()
    tok.save(os.path.join(path, 'tokenizer.json'))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump({'bos_token': '<s>', 'eos_token': '</s>',
                 'pad_token': '<pad>'}, f)
    t = hf_import.HFTokenizer(path)
    self.assertEqual((t.pad_id, t.bos_id, t.eos_id, t.vocab_size),
                     (0, 1, 2, 6))
    self.assertEqual(t.encode('ab a b'), [5, 3, 4])
    self.assertEqual(t.decode([5, 3, 2, 4]), 'ab a')

  def test_sentencepiece_model(self):
    import sentencepiece
    path = tempfile.mkdtemp()
    text = os.path.join(path, 'corpus.txt')
    with open(text, 'w') as f:
      f.write('\n'.join(['the cat sat on the mat', 'a dog and a cat',
                         'the mat is red'] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=text, model_prefix=os.path.join(path, 'tokenizer'),
        vocab_size=20, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
        minloglevel=2)
    t = hf_import.HFTokenizer(path)
    self.assertEqual((t.pad_id, t.bos_id, t.eos_id, t.vocab_size),
                     (0, 1, 2, 20))
    ids = t.encode('the cat sat')
    self.assertNotIn(3, ids)  # No unknown pieces.
    self.assertEqual(t.decode(ids + [t.eos_id] + ids), 'the cat sat')


if __name__ == '__main__':
  absltest.main()
