"""pytest setup shared by every test module.

Eight simulated CPU devices for the whole session, so sharding is exercised
everywhere (the flag must be set before JAX initialises its backend), a
shared compilation cache, and absl flags marked parsed, since pytest never
runs absl's main.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
# One persistent XLA compilation cache for the xdist workers and the
# subprocesses tests start: rows of a smoke pipeline compile the same
# programs (about 12% off the KV smoke pipeline test on 2 cores). Entries
# are keyed by program and JAX version, so a stale one is never reused.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), 'calm_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

from absl import flags  # pylint: disable=g-import-not-at-top

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
