"""Tiny real checkpoints and data for the tests, made on the spot.

A byte-level BPE tokenizer trained here with `tokenizers`, and Hugging Face
checkpoints of two families (a Llama anchor, a GPT-2 augmenting model)
saved with `transformers`, each with a copy of the tokenizer's files, as a
hub download would have them. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Iterable


def _fast_compile_xla_flags() -> str:
  """XLA_FLAGS that make XLA:CPU compile tiny programs fast.

  LLVM's optimisations off; XLA:CPU's elemental emitters instead of its
  fusion emitters (half the compile time of the KV smoke pipeline's
  programs); and each program's code generated as one module, not split
  for a thread pool that a test worker shares with the other one (compile
  time 60 -> 52 s): docs/research/performance.md. XLA aborts on a flag it
  does not know, so the last two are set only for the jaxlib they were
  measured on.
  """
  from importlib import metadata  # Standard library: no JAX imported.
  flags = ['--xla_backend_optimization_level=0']
  try:
    major, minor = (int(x) for x in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    major, minor = 0, 0
  if (major, minor) == (0, 10):
    flags += ['--xla_cpu_use_fusion_emitters=false',
              '--xla_cpu_parallel_codegen_split_count=1']
  return ' '.join(flags)


# Every test process compiles this way: test models are tiny and spend their
# time compiling (conftest.py adds this to XLA_FLAGS).
FAST_COMPILE_XLA_FLAGS = _fast_compile_xla_flags()
# XLA_FLAGS for a subprocess that runs on one CPU device, as a user would:
# without conftest.py's eight simulated devices.
ONE_DEVICE_XLA_FLAGS = FAST_COMPILE_XLA_FLAGS


def random_decoder_row(seed: int = 0, **arch: Any) -> tuple[Any, Any]:
  """A randomly initialised decoder (`arch`: DecoderConfig fields) as an
  `evaluation.Row` named 'm', and a one-device mesh to score it on."""
  # Deferred: this module is imported before JAX is configured.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from calm_jax import evaluation, sharding, tasks  # pylint: disable=g-import-not-at-top
  from calm_jax.models import transformer  # pylint: disable=g-import-not-at-top
  task = tasks.decoder_task('m', transformer.DecoderConfig(**arch))
  params = jax.jit(lambda r: nn.meta.unbox(task.init_trainable(r)))(
      jax.random.key(seed))
  return (evaluation.Row('m', task.model, params),
          sharding.make_mesh({'data': -1}, jax.devices()[:1]))


WORDS = ('red green blue cat dog bird fish tree house river stone cloud '
         'apple bread milk key door lamp book ship road').split()


def reverse_task(n: int, seed: int = 0) -> list[dict[str, str]]:
  """Prompt/completion pairs: reverse a few words."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = rng.sample(WORDS, rng.randint(2, 4))
    out.append({'prompt': 'reverse: ' + ' '.join(words) + ' =>',
                'completion': ' ' + ' '.join(reversed(words))})
  return out


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> str:
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return path


def train_bpe(directory: str, vocab_size: int = 320, seed_text: str = '',
              specials: tuple[str, ...] = ('<pad>', '<s>', '</s>')) -> str:
  """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  os.makedirs(directory, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  corpus = [f"{r['prompt']}{r['completion']}" for r in reverse_task(400)]
  if seed_text:
    corpus.append(seed_text)
  tok.train_from_iterator(corpus, trainer)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'pad_token': specials[0], 'bos_token': specials[1],
               'eos_token': specials[2]}, f)
  return directory


def vocab_size(tokenizer_dir: str) -> int:
  with open(os.path.join(tokenizer_dir, 'tokenizer.json')) as f:
    vocab = json.load(f)['model']['vocab']
  return max(vocab.values()) + 1


def _save(model: Any, directory: str, tokenizer_dir: str | None) -> str:
  model.save_pretrained(directory, safe_serialization=True)
  if tokenizer_dir:
    for name in ('tokenizer.json', 'tokenizer_config.json',
                 'tokenizer.model'):
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(directory, name))
  return directory


def llama(directory: str, tokenizer_dir: str | None, *, vocab: int = 0,
          layers: int = 4, context: int = 512, seed: int = 0) -> str:
  """A tiny random Llama (GQA) with the tokenizer's vocabulary."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab or vocab_size(tokenizer_dir), hidden_size=64,
      intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=context,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return _save(transformers.LlamaForCausalLM(cfg).eval(), directory,
               tokenizer_dir)


def gpt2(directory: str, tokenizer_dir: str | None, *, vocab: int = 0,
         layers: int = 4, context: int = 512, seed: int = 1) -> str:
  """A tiny random GPT-2 with the tokenizer's vocabulary."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(
      vocab_size=vocab or vocab_size(tokenizer_dir), n_embd=32,
      n_layer=layers, n_head=2, n_positions=context, bos_token_id=1,
      eos_token_id=2)
  return _save(transformers.GPT2LMHeadModel(cfg).eval(), directory,
               tokenizer_dir)
