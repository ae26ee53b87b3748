"""pytest setup shared by every test module.

Eight simulated CPU devices for the whole session, so sharding is exercised
everywhere (the flag must be set before JAX initialises its backend), and
absl flags marked parsed, since pytest never runs absl's main.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

from absl import flags  # pylint: disable=g-import-not-at-top

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
