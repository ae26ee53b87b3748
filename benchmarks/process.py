"""What every benchmark does first, before JAX or torch start their threads,
and the model sizes the scripts share.

Flag-free, so that any script here can import it (each defines its own
`--threads`).
"""

import os


def setup(threads: int) -> bool:
  """Restricts this process to `threads` cores before XLA (or torch) sizes
  its thread pool, and sets glibc's malloc as `calm_jax.main` does (freed
  memory kept for reuse: `calm_jax/host_memory.py`); returns whether that
  setting applies. The peer's benchmark calls it too: both frameworks run
  under the same allocator settings."""
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cores[:max(1, min(threads, len(cores)))])
  from calm_jax import host_memory  # pylint: disable=g-import-not-at-top
  return host_memory.retain_freed_memory()


# The two models of each `--config` (d_ff is 4 x d_model, GELU, LayerNorm,
# learned positions) and the vocabulary; each script adds its batch shape.
# `peer` is what calm-pytorch 0.2.2 is compared on; `1b` is issue #22's
# accelerator run (0.97B and 0.24B parameters; benchmarks/gpu.sh).
MODELS = {
    'peer': dict(anchor=dict(d_model=512, num_layers=8, num_heads=8),
                 aug=dict(d_model=256, num_layers=4, num_heads=4), vocab=256),
    'tiny': dict(anchor=dict(d_model=64, num_layers=4, num_heads=4),
                 aug=dict(d_model=32, num_layers=4, num_heads=2), vocab=64),
    '1b': dict(anchor=dict(d_model=2048, num_layers=18, num_heads=16),
               aug=dict(d_model=1024, num_layers=16, num_heads=16),
               vocab=32_000),
}
