r"""Decoding speed: the composed model against the anchor alone, both cached.

Prints one JSON object per model: mode, new_tokens_per_s (generated tokens
of the whole batch per second, median over repeats), s_per_call,
batch, prompt_len, new_tokens, and for every model but the anchor
vs_anchor_paired (its tokens/s over the anchor's, median of the ratios of
calls made in the same repeat: the models' calls take turns). calm_jax's
models also give step_gflop and step_mb, XLA's cost analysis of one cached
decode step of the batch (FLOPs, and bytes read and written: weights and
caches), and beside vs_anchor_paired the bounds a step limited by either
allows: vs_anchor_flop_bound and vs_anchor_bytes_bound, the anchor's step
over this one's.

  python benchmarks/decode.py --config=peer --threads=2

Every step feeds the new token to the anchor, the augmenting model and the
bridges' caches (the paper's decoding rule), so the ratio of the two lines
is the price of composition at decode time. `calm_prompt_only` is the
prompt-only ablation (m_A reads the prompt only): past the prompt its steps
skip m_A, and its step costs are of such a step.

`--transformers` adds the same anchor, in the Llama family (RMSNorm, RoPE,
gated SiLU MLP, no biases; the sizes above), decoded by calm_jax
(`anchor_llama`) and by Hugging Face `transformers`' `generate`
(`transformers_llama`: LlamaForCausalLM, greedy, KV cache, torch on the same
threads), with random weights: speed only, same batch, prompt and new
tokens, no early stop. On a GPU both run there (torch on CUDA, in `--dtype`).

`1b` is the accelerator run (`benchmarks/gpu.sh`): train_step.py's ~1B
anchor and ~250M m_A, batch 8, 128 prompt and 128 new tokens, with
`--dtype=bfloat16` (weights and compute of both models; the bridges stay
float32).
"""

from absl import app
from absl import flags

# This script's directory is sys.path[0] when it runs: process.py is its
# neighbour, whatever the working directory.
import process  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_enum('config', 'peer', ['peer', 'tiny', '1b'],
                            'Sizes.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           "The models' weights and compute (not the "
                           "bridges').")
_THREADS = flags.DEFINE_integer('threads', 2, 'CPU cores the run may use.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per model.')
_NEW = flags.DEFINE_integer('new_tokens', 0, 'Tokens to generate (0: the '
                            "config's).")
_TRANSFORMERS = flags.DEFINE_bool(
    'transformers', False, "Also time the anchor (Llama family) against "
    "transformers' generate.")

# Batch, prompt and new tokens by --config (the models: process.MODELS).
SIZES = {name: dict(models, **shape) for name, models, shape in (
    ('peer', process.MODELS['peer'], dict(batch=8, prompt=32, new=96)),
    ('tiny', process.MODELS['tiny'], dict(batch=4, prompt=8, new=8)),
    ('1b', process.MODELS['1b'], dict(batch=8, prompt=128, new=128)))}


def main(argv):
  del argv
  process.setup(_THREADS.value)
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

  device = jax.devices()[0]
  size = SIZES[_CONFIG.value]
  b, plen = size['batch'], size['prompt']
  new = _NEW.value or size['new']
  common = dict(vocab_size=size['vocab'], max_len=plen + new, mlp='gelu',
                norm='layernorm', position='learned', dtype=_DTYPE.value,
                param_dtype=_DTYPE.value)
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

  runs = []  # (mode, a call that decodes the batch and waits for it).
  models = [('anchor', transformer.Decoder(anchor)), ('calm', composed),
            ('calm_prompt_only', composed.clone(prompt_only=True))]
  llama = None
  if _TRANSFORMERS.value:
    llama = transformer.DecoderConfig(
        vocab_size=size['vocab'], max_len=plen + new, d_ff=4 * size['anchor'][
            'd_model'], tie_embeddings=False, dtype=_DTYPE.value,
        param_dtype=_DTYPE.value, **size['anchor'])
    models.append(('anchor_llama', transformer.Decoder(llama)))
  def step_cost(model, params, kw):
    """XLA's FLOPs and bytes of one cached decode step of the batch (past
    the prompt)."""
    tok = jnp.zeros((b, 1), jnp.int32)
    cache = jax.jit(lambda t: decoding._zero_cache(model, t, kw))(tok)
    step = decoding._compiled_step(model, 0.0, 0, 1.0, True)
    cost = step.lower(params, cache, tok, jax.random.key(0), kw).compile(
        ).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops'], cost['bytes accessed']

  costs = {}  # mode: (FLOPs, bytes) of one decode step.
  for mode, model in models:
    kw = ({'prompt_len': jnp.asarray(prompt_len)}
          if getattr(model, 'prompt_only', False) else {})
    params = params_of(model, **kw)
    costs[mode] = step_cost(model, params, kw)
    runs.append((mode, lambda model=model, params=params, kw=kw:
                 decoding.generate(model, params, prompts, prompt_len,
                                   max_new_tokens=new, eos_id=-1,
                                   model_kwargs=kw
                                   )['new_tokens'].block_until_ready()))

  if llama is not None:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_THREADS.value)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llama.vocab_size, hidden_size=llama.d_model,
        intermediate_size=llama.d_ff, num_hidden_layers=llama.num_layers,
        num_attention_heads=llama.num_heads,
        num_key_value_heads=llama.kv_heads,
        max_position_embeddings=llama.max_len, rms_norm_eps=llama.norm_eps,
        rope_theta=llama.rope_theta, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    on_gpu = device.platform == 'gpu' and torch.cuda.is_available()
    hf = hf.to('cuda' if on_gpu else 'cpu', dtype=getattr(torch, _DTYPE.value))
    ids = torch.from_numpy(prompts.astype(np.int64)).to(hf.device)

    def hf_run():
      with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    use_cache=True)
      if on_gpu:
        torch.cuda.synchronize()

    runs.append(('transformers_llama', hf_run))

  # Every model is compiled (or warmed up) first; then the timed calls take
  # turns, the order reversed each repeat, so that a slow spell of a shared
  # machine falls on all of them rather than on one.
  for _, run in runs:
    run()
  times = {mode: [] for mode, _ in runs}
  for r in range(_REPEATS.value):
    for mode, run in (runs if r % 2 == 0 else runs[::-1]):
      start = time.perf_counter()
      run()
      times[mode].append(time.perf_counter() - start)
  for mode, _ in runs:
    s = statistics.median(times[mode])
    line = {
        'mode': mode, 'config': _CONFIG.value,
        'new_tokens_per_s': round(b * new / s, 1), 's_per_call': round(s, 4),
        'batch': b, 'prompt_len': plen, 'new_tokens': new,
        'threads': _THREADS.value, 'dtype': _DTYPE.value,
        'device': device.platform, 'device_kind': device.device_kind}
    if mode in costs:
      line['step_gflop'] = round(costs[mode][0] / 1e9, 4)
      line['step_mb'] = round(costs[mode][1] / 1e6, 2)
    if mode != 'anchor':
      # Tokens/s over the anchor alone's, call by call in the same repeat.
      line['vs_anchor_paired'] = round(statistics.median(
          a / m for a, m in zip(times['anchor'], times[mode])), 3)
    if mode != 'anchor' and mode in costs:
      line['vs_anchor_flop_bound'] = round(
          costs['anchor'][0] / costs[mode][0], 3)
      line['vs_anchor_bytes_bound'] = round(
          costs['anchor'][1] / costs[mode][1], 3)
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
  app.run(main)
