"""calm_jax.host_memory: XLA's per-call buffers are not faulted in again."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose two 80 MB intermediates XLA keeps in one
# temporary memory, as a training step does; prints the median of the minor
# page faults per call after the first (the median: retained, the heap still
# grows on a few calls, while XLA frees one call's buffers after the next
# call has taken its own).
_PROBE = r'''
import json, resource, sys
from calm_jax import host_memory
applied = host_memory.retain_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  y = jax.lax.optimization_barrier(jnp.sin(x))
  z = jax.lax.optimization_barrier(jnp.cos(y))
  return (y * z).sum()

x = jnp.ones((20 * 2**20,), jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'faults_per_call': sorted(faults)[15]}))
'''


def _probe(retain: bool) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT,
             CALM_RETAIN_FREED_MEMORY='1' if retain else '0')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@absltest.skipUnless(sys.platform.startswith('linux'), 'glibc malloc only')
class HostMemoryTest(absltest.TestCase):

  def test_a_jitted_call_reuses_its_temporary_pages(self):
    default = _probe(retain=False)
    retained = _probe(retain=True)
    self.assertFalse(default['applied'])
    if not retained['applied']:
      self.skipTest('not glibc')
    # 160 MB of temporaries is ~40,000 fresh 4 KiB pages per call when they
    # are mapped anew each time; reused, ~0.
    self.assertGreater(default['faults_per_call'], 10_000)
    self.assertLess(retained['faults_per_call'],
                    default['faults_per_call'] / 10)


if __name__ == '__main__':
  absltest.main()
