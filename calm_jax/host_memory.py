"""Host memory: keep XLA's CPU buffers mapped between steps.

XLA's CPU runtime allocates each step's temporaries as one block
(`posix_memalign`) and frees it when the step ends. With glibc's default
settings a block that size is mapped fresh from the kernel on every step and
unmapped after it, so every page is faulted in again: on the key-value
default's composition step (a 68 MB block) that was ~10,000 page faults and
a third of the process's CPU time in the kernel (`docs/research/
performance.md`). `retain_freed_memory()` makes glibc serve large blocks from
its main heap and keep what is freed there, so the next step reuses the same
pages.

It must run before JAX starts its CPU threads (each thread that allocates
first gets its own glibc arena, which maps large blocks whatever the
settings): the entry points (`calm_jax.main`, the benchmarks) call it first.
In a notebook, call it before the first JAX computation, or start the kernel
with `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=4294967295`.

The cost: memory freed by the process stays with it (its peak resident size
does not shrink until it exits), and one glibc arena serves every thread.
`CALM_RETAIN_FREED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV = 'CALM_RETAIN_FREED_MEMORY'

_applied: bool | None = None


def retain_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory instead of unmapping it.

  Returns True when the settings were applied (Linux with glibc, not turned
  off by `CALM_RETAIN_FREED_MEMORY=0`); idempotent.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, '1') == '0' or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):  # Not glibc (e.g. musl): leave it be.
    return False
  # One arena for every thread: only the main arena honours M_MMAP_MAX (a
  # thread's own arena maps any block larger than its 64 MB heap).
  # No mmap-backed blocks, and no trimming of the heap's free top.
  _applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, 2**31 - 1)))
  return _applied
