r"""Decoding speed: the composed model against the anchor alone, both cached.

Prints one JSON object per model: mode, new_tokens_per_s (generated tokens
of the whole batch per second, median over repeats), s_per_call,
batch, prompt_len, new_tokens.

  python benchmarks/decode.py --config=peer --threads=2

Every step feeds the new token to the anchor, the augmenting model and the
bridges' caches (the paper's decoding rule), so the ratio of the two lines
is the price of composition at decode time.
"""

import os

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_enum('config', 'peer', ['peer', 'tiny'], 'Sizes.')
_THREADS = flags.DEFINE_integer('threads', 2, 'CPU cores the run may use.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per model.')
_NEW = flags.DEFINE_integer('new_tokens', 0, 'Tokens to generate (0: the '
                            "config's).")

SIZES = {
    'peer': dict(anchor=dict(d_model=512, num_layers=8, num_heads=8),
                 aug=dict(d_model=256, num_layers=4, num_heads=4),
                 vocab=256, batch=8, prompt=32, new=96),
    'tiny': dict(anchor=dict(d_model=64, num_layers=4, num_heads=4),
                 aug=dict(d_model=32, num_layers=4, num_heads=2),
                 vocab=64, batch=4, prompt=8, new=8),
}


def main(argv):
  del argv
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cores[:max(1, min(_THREADS.value, len(cores)))])
  import json
  import statistics
  import time

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from calm_jax import decoding
  from calm_jax.models import composition
  from calm_jax.models import transformer

  size = SIZES[_CONFIG.value]
  b, plen = size['batch'], size['prompt']
  new = _NEW.value or size['new']
  common = dict(vocab_size=size['vocab'], max_len=plen + new, mlp='gelu',
                norm='layernorm', position='learned')
  anchor = transformer.DecoderConfig(d_ff=4 * size['anchor']['d_model'],
                                     **size['anchor'], **common)
  aug = transformer.DecoderConfig(d_ff=4 * size['aug']['d_model'],
                                  **size['aug'], **common)
  composed = composition.ComposedLM(anchor, (composition.Augmenting(
      'x', aug, composition.select_pairs(aug.num_layers, anchor.num_layers,
                                         4)),))
  prompts = np.random.default_rng(0).integers(
      3, size['vocab'], (b, plen)).astype(np.int32)
  prompt_len = np.full((b,), plen, np.int32)

  def params_of(model, **kw):
    init = jax.jit(lambda r: nn.meta.unbox(model.init(
        r, jnp.zeros((1, 4), jnp.int32), **kw)['params']))
    return init(jax.random.key(0))

  for mode, model, params, kw in (
      ('anchor', transformer.Decoder(anchor), params_of(
          transformer.Decoder(anchor)), {}),
      ('calm', composed, params_of(composed), {})):
    run = lambda: decoding.generate(
        model, params, prompts, prompt_len, max_new_tokens=new,
        eos_id=-1, model_kwargs=kw)['new_tokens'].block_until_ready()
    run()  # Compile.
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    s = statistics.median(times)
    print(json.dumps({
        'mode': mode, 'config': _CONFIG.value,
        'new_tokens_per_s': round(b * new / s, 1), 's_per_call': round(s, 4),
        'batch': b, 'prompt_len': plen, 'new_tokens': new,
        'threads': _THREADS.value, 'device': jax.devices()[0].platform}),
          flush=True)


if __name__ == '__main__':
  app.run(main)
