r"""Train-step speed of the peer implementation, lucidrains/CALM-pytorch 0.2.2.

The point is a like-for-like number next to `train_step.py --modes=calm`:
the same model sizes (its `SIZES`), the same batch (b x seq tokens, loss over
every position), the same composed layer pairs, the same analytic FLOP count
(its `useful_flops`) and the same peak measure (its `MatmulPeak`: dense
float32 1024x1024 matmuls in bursts through the run, here with torch), so
`mfu` is comparable. On a
machine whose cores other processes also use, that peak is measured under
the same contention as the step and can come out low: mfu > 1 means so.

  python benchmarks/peer_calm_pytorch.py --config=peer \
      --pairs=0:1,1:3,2:5,3:7 --steps=10 --threads=2

`--config`, `--steps`, `--threads` and `--pairs` are train_step.py's own
flags: this script imports train_step (whose import is light: os, sys, absl)
to reuse `SIZES`, `parse_pairs` and `useful_flops` rather than copy them,
and absl allows one definition per flag name. train_step's other flags
(`--modes`, `--remat`, ...) mean nothing here and are refused.

`--pairs` uses our convention: 0-based `aug_layer:anchor_layer`, the bridge
is added to the anchor's residual stream right after anchor block j, reading
m_A's output of block i. calm-pytorch's `connections` are the same pairs
1-based; the script checks (asserts) that the blocks it hooks are the
per-layer block outputs, in execution order, one per layer. Empty `--pairs`
is the paper's rule computed like ours (`composition.select_pairs(..., 4)`).

Each step: zero_grad, loss = calm(seq, prompt=prompt), backward,
clip_grad_norm_(1.0), AdamW(lr=1e-3, weight_decay=0.01) over
`calm.parameters()` (only the cross-attentions). The prompt is the anchor's
whole input, so m_A reads the same b x seq tokens as the anchor.

Same shapes and pairs, not bit-identical math. Differences from calm_jax's
step (none changes the matmul shapes counted by `useful_flops`, except the
last two bullets, which make calm-pytorch do a little MORE work):
  * Cross-attention (calm-pytorch `CrossAttentionBlock`): pre-RMSNorm on the
    anchor stream (ours: RMS-norm of queries and of the projected keys/
    values); a context projection D_A -> D_B WITH bias (ours: bias-free);
    x-transformers `Attention` with `gate_value_heads` (a per-head sigmoid
    gate on the values, an extra D_B -> heads linear); zero-initialised
    output; scaled-dot-product ("flash") kernel. Its heads and head size are
    set here to the anchor's (heads, d_model // heads), as ours; for `peer`
    that equals calm-pytorch's default (8 x 64).
  * No causal mask on the context: calm-pytorch masks padding only, so
    anchor position t reads every augmenting position (ours: s <= t). The
    FLOPs are the same (full [t, t] scores either way).
  * Models are x-transformers defaults: pre-LayerNorm, GELU FFN (x4) with
    biases, learned absolute positions, untied output head, explicit
    (non-SDPA) self-attention; ours are bias-free with tied embeddings.
  * Schedule: a constant lr (ours: warm-up then cosine; negligible cost).
  * calm-pytorch runs m_A's WHOLE forward, head included, under no_grad
    (ours stops after the highest composed augmenting block, no head).
  * calm-pytorch keeps a forward hook (its `Recorder`) on every anchor
    block that appends each block's detached output to a list it never
    clears after construction. It costs an append per block in the timed
    step; the script empties those lists between steps, outside the timer,
    so memory does not grow with --steps.
"""

from absl import app
from absl import flags

# This script's directory is sys.path[0] when it runs: train_step.py and
# process.py are its neighbours, whatever the working directory.
import process  # pylint: disable=g-import-not-at-top
import train_step  # pylint: disable=g-import-not-at-top

# train_step.py's flags this script uses; any other of its flags (--modes,
# --remat, --frozen_dtype, ...) means nothing here and is refused if given.
_SHARED_FLAGS = ('config', 'steps', 'threads', 'pairs')


def check_blocks(calm_lib, model, num_layers: int, name: str) -> list:
  """calm-pytorch's hooked blocks for `model`, checked against ours.

  calm-pytorch hooks `x_transformer_blocks(model)`: the residual module of
  every second attn_layers entry (`blocks[1::2]`). Attention and
  feed-forward sublayers alternate, so entry 2j+1 is layer j's feed-forward
  and its residual output is the stream after block j -- our block j's
  output -- only if the layer types are exactly ('a', 'f') * num_layers.
  """
  layers = model.attn_layers
  types = tuple(layers.layer_types)
  assert types == ('a', 'f') * num_layers, (
      f'{name}: x-transformers layer types are {types}, not (attention, '
      f'feed-forward) x {num_layers}; calm-pytorch blocks[1::2] would not be '
      'the per-layer block outputs.')
  blocks = calm_lib.x_transformer_blocks(model)
  ours = [layer[-1] for layer, kind in zip(layers.layers, types)
          if kind == 'f']
  assert len(blocks) == num_layers, (
      f'{name}: calm-pytorch hooks {len(blocks)} blocks, the model has '
      f'{num_layers} layers.')
  assert all(a is b for a, b in zip(blocks, ours)), (
      f'{name}: calm-pytorch hooked block k is not the residual output of '
      'layer k\'s feed-forward sublayer.')
  return blocks


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for flag in flags.FLAGS.flags_by_module_dict().get(
      train_step.__name__, []):
    if flag.name not in _SHARED_FLAGS and flag.present:
      raise app.UsageError(f'--{flag.name} is a train_step.py flag with no '
                           'meaning for the calm-pytorch benchmark.')
  threads = train_step._THREADS.value  # pylint: disable=protected-access
  steps = train_step._STEPS.value  # pylint: disable=protected-access
  config = train_step._CONFIG.value  # pylint: disable=protected-access
  if steps < 1:
    raise app.UsageError('--steps must be at least 1.')
  # Before torch (and numpy's BLAS) size their thread pools.
  retained = process.setup(threads)
  import importlib
  import importlib.metadata
  import json
  import resource
  import statistics
  import time

  import torch
  import CALM_pytorch
  # The module, not the class of the same name the package re-exports.
  calm_lib = importlib.import_module('CALM_pytorch.CALM')
  from x_transformers import Decoder, TransformerWrapper

  from calm_jax.models import transformer

  torch.set_num_threads(threads)
  torch.manual_seed(0)

  size = train_step.SIZES[config]
  b, t, vocab = size['batch'], size['seq'], size['vocab']
  # Ours, as train_step.py builds them: only for pair selection and FLOPs.
  common = dict(vocab_size=vocab, max_len=t, mlp='gelu', norm='layernorm',
                position='learned')
  anchor_cfg = transformer.DecoderConfig(
      d_ff=4 * size['anchor']['d_model'], **size['anchor'], **common)
  aug_cfg = transformer.DecoderConfig(
      d_ff=4 * size['aug']['d_model'], **size['aug'], **common)

  # '' -> composition.select_pairs(aug_layers, anchor_layers, 4).
  pairs_text = train_step._PAIRS.value.strip()  # pylint: disable=W0212
  pairs = train_step.parse_pairs(pairs_text, aug_cfg, anchor_cfg)
  if any(j < 0 for _, j in pairs):
    raise app.UsageError(
        '--pairs: anchor layer -1 (the embeddings) has no calm-pytorch '
        'equivalent; it hooks block outputs only.')
  connections = tuple((i + 1, j + 1) for i, j in pairs)  # 1-based.

  def decoder(cfg):
    """x-transformers defaults: pre-LayerNorm, GELU FFN, learned positions."""
    return TransformerWrapper(
        num_tokens=vocab, max_seq_len=t,
        attn_layers=Decoder(dim=cfg.d_model, depth=cfg.num_layers,
                            heads=cfg.num_heads, ff_mult=4,
                            attn_dim_head=cfg.dim_per_head))

  anchor = decoder(anchor_cfg)
  aug = decoder(aug_cfg)
  anchor_blocks = check_blocks(calm_lib, anchor, anchor_cfg.num_layers,
                               'anchor')
  aug_blocks = check_blocks(calm_lib, aug, aug_cfg.num_layers, 'augmenting')

  # calm-pytorch's defaults plus the anchor's head layout (ours, and for
  # `peer` its own default 8 x 64).
  attn_kwargs = dict(linear_project_context=True, pre_rmsnorm=True,
                     flash=True, heads=anchor_cfg.num_heads,
                     dim_head=anchor_cfg.dim_per_head)
  calm = calm_lib.CALM(
      anchor, calm_lib.AugmentParams(model=aug, connections=connections),
      attn_kwargs=attn_kwargs)

  # The pairs landed where ours would: cross-attention k hooks anchor block
  # j_k and reads m_A's block i_k, recorded in execution order.
  assert tuple(calm.connections[0]) == connections, (calm.connections,
                                                     connections)
  for (i, j), cross in zip(pairs, calm.cross_attns[0]):
    assert any(h is cross for h in anchor_blocks[j]._forward_hooks.values()), (
        f'pair ({i}, {j}): its cross-attention is not hooked on anchor '
        f'block {j}.')
  with torch.no_grad():
    _, executed = calm.augment_llms[0](torch.ones((1, 1), dtype=torch.long),
                                       return_hooked_modules=True)
  assert len(executed) == len(aug_blocks) and all(
      a is e for a, e in zip(aug_blocks, executed)), (
          'augmenting: calm-pytorch records block outputs out of block '
          'order, so its 1-based layer index would not be our block i + 1.')

  # calm-pytorch's construction-time anchor recorders (see the docstring).
  leaky = [h for block in anchor_blocks for h in block._forward_hooks.values()
           if isinstance(h, calm_lib.Recorder)]

  def clear_recorders():
    for h in leaky:
      h.output.clear()
      if h.modules is not None:
        h.modules.clear()

  params = list(calm.parameters())
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
  gen = torch.Generator().manual_seed(0)
  seq = torch.randint(0, vocab, (b, t + 1), generator=gen)
  prompt = seq[:, :-1]  # The anchor's whole input (CALM splits off labels).

  def step():
    opt.zero_grad(set_to_none=True)
    loss = calm(seq, prompt=prompt)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss

  square = torch.randn(1024, 1024, dtype=torch.float32,
                       generator=torch.Generator().manual_seed(0))
  peak = train_step.MatmulPeak(lambda: torch.mm(square, square),
                               2 * 1024 ** 3)
  for _ in range(2):  # Warm-up.
    step()
    clear_recorders()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
    clear_recorders()
    peak.burst()
  assert torch.isfinite(loss), f'non-finite loss {loss.item()}'
  step_s = statistics.median(times)
  flops = train_step.useful_flops('calm', anchor_cfg, aug_cfg, pairs, b * t,
                                  t, 0)
  print(json.dumps({
      'mode': 'calm_pytorch', 'config': config,
      'pairs': [list(p) for p in pairs],
      'step_s': round(step_s, 4),
      'tokens_per_s': round(b * t / step_s, 1),
      'rss_mib': round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'useful_gflop': round(flops / 1e9, 3),
      'mfu': round(flops / step_s / peak.flops, 4),
      'peak_gflops': round(peak.flops / 1e9, 1),
      'trainable_params': sum(p.numel() for p in params),
      'threads': threads, 'retain_freed_memory': retained,
      'torch': torch.__version__,
      'calm_pytorch': getattr(CALM_pytorch, '__version__', None)
                      or importlib.metadata.version('CALM-Pytorch'),
      'x_transformers': importlib.metadata.version('x-transformers'),
  }), flush=True)


if __name__ == '__main__':
  app.run(main)
