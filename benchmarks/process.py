"""What every benchmark does first, before JAX or torch start their threads.

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
