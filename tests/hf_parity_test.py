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
from calm_jax import sharding
from calm_jax.models import transformer

try:
  import torch
  import transformers
except ImportError:  # The test extra is not installed.
  torch = transformers = None

VOCAB = 128
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# Window 8 < the 24-token test sequences and < prompt + generation (16).
GEMMA3 = dict(LLAMA, num_hidden_layers=4, head_dim=16, sliding_window=8,
              query_pre_attn_scalar=16, layer_types=[
                  'sliding_attention', 'sliding_attention',
                  'sliding_attention', 'full_attention'],
              rope_parameters={
                  'full_attention': {'rope_type': 'linear', 'factor': 4.0,
                                     'rope_theta': 1e6},
                  'sliding_attention': {'rope_type': 'default',
                                        'rope_theta': 1e4}})
CASES = {
    'llama_gqa': ('LlamaConfig', 'LlamaForCausalLM', LLAMA),
    'llama3_rope_scaling': ('LlamaConfig', 'LlamaForCausalLM', dict(
        LLAMA, rope_parameters={
            'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
            'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
            'original_max_position_embeddings': 16})),
    'llama_biases_tied': ('LlamaConfig', 'LlamaForCausalLM', dict(
        LLAMA, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    'mistral_sliding': ('MistralConfig', 'MistralForCausalLM', dict(
        LLAMA, sliding_window=8)),
    'qwen2_sliding': ('Qwen2Config', 'Qwen2ForCausalLM', dict(
        LLAMA, use_sliding_window=True, sliding_window=8,
        max_window_layers=1)),
    'gemma': ('GemmaConfig', 'GemmaForCausalLM', dict(
        LLAMA, num_key_value_heads=1, head_dim=32)),
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM', dict(
        LLAMA, num_hidden_layers=4, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM', GEMMA3),
    # The text model out of a multimodal checkpoint; the vision tower stays.
    'gemma3_multimodal': (
        'Gemma3Config', 'Gemma3ForConditionalGeneration', dict(
            text_config=dict(GEMMA3, num_hidden_layers=2, layer_types=[
                'sliding_attention', 'full_attention']),
            vision_config=dict(hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4)),
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2)),
}


def _build(case):
  """A tiny `transformers` model whose every tensor is random."""
  cfg_name, model_name, kw = CASES[case]
  torch.manual_seed(0)
  model = getattr(transformers, model_name)(
      getattr(transformers, cfg_name)(**kw)).eval()
  with torch.no_grad():
    # transformers initialises norms to 1 (Gemma: 0) and biases to 0, which
    # would hide a dropped or swapped norm or bias.
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model


def _save(model, **save_kw) -> str:
  path = tempfile.mkdtemp()
  model.save_pretrained(path, safe_serialization=True, **save_kw)
  return path


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _max_diff(model, params, tokens, ref) -> float:
  out = np.asarray(jax.jit(model.apply)({'params': params}, tokens))
  return float(np.abs(out - ref).max())


def _tokens(length=24):
  return np.random.default_rng(0).integers(3, VOCAB, (2, length))


@absltest.skipIf(torch is None, 'needs the test extra (torch, transformers)')
class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(c, c) for c in CASES])
  def test_logits_and_greedy_generation(self, case):
    ref_model = _build(case)
    model, params = calm_jax.load_pretrained(_save(ref_model))
    tokens = _tokens()
    out = np.asarray(jax.jit(model.apply)({'params': params}, tokens))
    self.assertEqual(out.shape, (2, 24, VOCAB))
    np.testing.assert_allclose(out, _torch_logits(ref_model, tokens),
                               rtol=0, atol=1e-4)

    # 6 prompt + 10 new tokens: past every sliding window above.
    prompt = tokens[:, :6]
    with torch.no_grad():
      ref_gen = ref_model.generate(
          torch.tensor(prompt), attention_mask=torch.ones_like(
              torch.tensor(prompt)), max_new_tokens=10, min_new_tokens=10,
          do_sample=False, pad_token_id=0).numpy()[:, 6:]
    # Our KV-cache path, one token per step.
    ours = decoding.generate(model, params, prompt,
                             np.full((2,), 6, np.int32), max_new_tokens=10,
                             eos_id=-1)
    np.testing.assert_array_equal(np.asarray(ours['new_tokens']), ref_gen)

  def test_sharded_index_and_dtypes(self):
    ref_model = _build('llama_gqa')
    path = _save(ref_model, max_shard_size='20KB')
    self.assertTrue(os.path.exists(
        os.path.join(path, 'model.safetensors.index.json')))
    self.assertGreater(
        len([f for f in os.listdir(path) if f.endswith('.safetensors')]), 2)
    tokens = _tokens(16)
    ref = _torch_logits(ref_model, tokens)
    model, params = calm_jax.load_pretrained(path)
    self.assertLessEqual(_max_diff(model, params, tokens, ref), 1e-4)
    model, params = calm_jax.load_pretrained(path, dtype='bfloat16')
    for leaf in jax.tree_util.tree_leaves(params):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
    # bf16 weights and compute: close, not exact (logits have std ~1).
    self.assertLess(_max_diff(model, params, tokens, ref), 0.15)

    # Real checkpoints store bfloat16, which numpy only knows via ml_dtypes.
    # The reference keeps float32 compute (and RoPE buffers) on the same
    # bf16-rounded weights.
    with torch.no_grad():
      for p in ref_model.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    ref = _torch_logits(ref_model, tokens)
    path = _save(ref_model.to(torch.bfloat16))
    from safetensors import safe_open
    with safe_open(os.path.join(path, 'model.safetensors'), 'numpy') as f:
      self.assertEqual(f.get_slice('lm_head.weight').get_dtype(), 'BF16')
    model, params = calm_jax.load_pretrained(path)
    self.assertLessEqual(_max_diff(model, params, tokens, ref), 1e-4)

  def test_loads_onto_mesh(self):
    ref_model = _build('llama_gqa')
    path = _save(ref_model)
    _, cfg = hf_import.read_config(path)
    mesh = sharding.make_mesh({'fsdp': -1})
    boxed = jax.eval_shape(lambda: transformer.Decoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
    shardings = sharding.param_shardings(boxed, mesh,
                                         sharding.logical_rules())
    model, params = calm_jax.load_pretrained(path, shardings=shardings)
    placed = jax.tree_util.tree_leaves(params)
    wanted = jax.tree_util.tree_leaves(shardings)
    self.assertEqual([x.sharding for x in placed], wanted)
    if jax.device_count() > 1:
      self.assertTrue(any(not s.is_fully_replicated for s in wanted))
    tokens = _tokens(16)
    self.assertLessEqual(
        _max_diff(model, params, tokens, _torch_logits(ref_model, tokens)),
        1e-4)

  @parameterized.parameters('llama_gqa', 'gpt2')
  def test_each_shard_is_read_on_its_own(self, case):
    # On a mesh, each device's shard of a parameter is read from the file by
    # itself (safetensors get_slice), so a process of a multi-host run reads
    # only the shards it holds: no read here may be a whole sharded tensor.
    if jax.device_count() < 8:
      self.skipTest('needs 8 devices (tests/conftest.py simulates them)')
    ref_model = _build(case)
    path = _save(ref_model)
    _, cfg = hf_import.read_config(path)
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
    boxed = jax.eval_shape(lambda: transformer.Decoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
    shardings = sharding.param_shardings(boxed, mesh,
                                         sharding.logical_rules())
    reads = {}
    real = hf_import._tensors

    def spy(p):
      for key, lazy in real(p):
        base = lazy._read
        def counted(index, base=base, key=key):
          block = base(index)
          reads.setdefault(key, []).append(block.size)
          return block
        yield key, hf_import._Lazy(lazy.shape, counted)

    with absltest.mock.patch.object(hf_import, '_tensors', spy):
      model, params = calm_jax.load_pretrained(path, shardings=shardings)
    sizes = {k: v.numel() for k, v in ref_model.state_dict().items()}
    sharded = 0
    for key, blocks in reads.items():
      if len(blocks) > 1 and key in sizes:  # Placed over several devices.
        if max(blocks) < sizes[key]:
          sharded += 1
    # Most kernels are split 4- or 8-ways; every one of them was read in
    # parts (norm scales and biases are replicated or small).
    kernels = [k for k in reads if k.endswith('weight') and
               len(ref_model.state_dict()[k].shape) == 2]
    self.assertGreater(sharded, len(kernels) // 2, reads)
    tokens = _tokens(16)
    self.assertLessEqual(
        _max_diff(model, params, tokens, _torch_logits(ref_model, tokens)),
        1e-4)

  def test_max_len(self):
    model, _ = calm_jax.load_pretrained(_save(_build('llama_gqa')),
                                        max_len=32)
    self.assertEqual(model.config.max_len, 32)
    path = _save(_build('gpt2'))
    _, params = calm_jax.load_pretrained(path, max_len=16)
    self.assertEqual(params['pos_embedding'].shape, (16, 64))
    with self.assertRaisesRegex(ValueError, 'learned positions for only 64'):
      calm_jax.load_pretrained(path, max_len=65)

  # config.json as older transformers versions (or the Hub) write it, often
  # leaving out default values. Read directly, it must give what we read
  # after transformers itself has parsed and re-saved it.
  @parameterized.named_parameters(*{
      'llama31': dict(
          model_type='llama', num_key_value_heads=2, rope_theta=500000.0,
          max_position_embeddings=131072, rope_scaling={
              'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
              'original_max_position_embeddings': 8192,
              'rope_type': 'llama3'}),
      'llama_linear': dict(model_type='llama', rope_scaling={
          'type': 'linear', 'factor': 2.0}),
      'mistral_v01': dict(model_type='mistral'),
      'mistral_v02': dict(model_type='mistral', sliding_window=None,
                          rope_theta=1e6),
      'qwen2_sliding': dict(model_type='qwen2', use_sliding_window=True,
                            max_window_layers=2, sliding_window=32),
      'gemma_legacy_gelu': dict(model_type='gemma', hidden_act='gelu',
                                head_dim=16),
      'gemma2_default_softcaps': dict(model_type='gemma2', head_dim=16,
                                      query_pre_attn_scalar=16),
      'gemma3_pattern': dict(
          model_type='gemma3_text', num_hidden_layers=7, head_dim=16,
          sliding_window_pattern=3, rope_local_base_freq=5000.0,
          rope_theta=2e6, sliding_window=512,
          rope_scaling={'rope_type': 'linear', 'factor': 8.0}),
      'gemma3_multimodal': dict(model_type='gemma3', text_config=dict(
          hidden_size=64, intermediate_size=128, num_hidden_layers=7,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          sliding_window=512,
          rope_scaling={'rope_type': 'linear', 'factor': 8.0})),
      'gpt2': dict(model_type='gpt2', n_embd=64, n_layer=2, n_head=4),
  }.items())
  def test_legacy_config_reads_as_transformers_does(self, raw):
    if raw['model_type'] not in ('gemma3', 'gpt2'):
      raw = dict(dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2), **raw)
    path = tempfile.mkdtemp()
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(raw, f)
    resaved = tempfile.mkdtemp()
    transformers.AutoConfig.from_pretrained(path).save_pretrained(resaved)
    self.assertEqual(hf_import.read_config(path)[1].to_dict(),
                     hf_import.read_config(resaved)[1].to_dict())

  def test_errors(self):
    path = _save(_build('llama_gqa'))
    with open(os.path.join(path, 'config.json')) as f:
      good = json.load(f)

    def load_with(**changes):
      with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(dict(good, **changes), f)
      return calm_jax.load_pretrained(path)

    with self.assertRaisesRegex(ValueError, r"model_type='mamba' is not "
                                r'supported'):
      load_with(model_type='mamba')
    with self.assertRaisesRegex(ValueError, r"RoPE type 'yarn' is not "
                                'supported'):
      load_with(rope_parameters={'rope_type': 'yarn', 'factor': 4.0})
    with self.assertRaisesRegex(ValueError, 'mlp_bias=False is not '
                                'supported'):
      load_with(attention_bias=True)
    with self.assertRaisesRegex(ValueError, r"'hidden_size' is missing"):
      load_with(hidden_size=None)
    with self.assertRaisesRegex(ValueError, r"tensor 'model\.layers\.0\."
                                r"self_attn\.[kqv]_proj\.weight' of shape "
                                r'\(\d+, 64\) does not fit'):
      load_with(num_attention_heads=8, num_key_value_heads=4)
    with self.assertRaisesRegex(ValueError, r'lacks 1 of the parameters .*'
                                'unembedding'):
      self._load_without_lm_head(path, good)
    with self.assertRaisesRegex(ValueError, r'config\.json is missing'):
      calm_jax.load_pretrained(tempfile.mkdtemp())

  def _load_without_lm_head(self, path, good):
    """An untied Llama missing its head: the error names what is missing."""
    from safetensors.numpy import load_file, save_file
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(good, f)
    file = os.path.join(path, 'model.safetensors')
    tensors = load_file(file)
    del tensors['lm_head.weight']
    save_file(tensors, file, metadata={'format': 'pt'})
    return calm_jax.load_pretrained(path)


if __name__ == '__main__':
  absltest.main()
