"""pytest setup shared by every test module.

Eight simulated CPU devices for the whole session, so sharding is exercised
everywhere (the flag must be set before JAX initialises its backend), LLVM's
optimisations off (tiny models: compiling is most of a test's time), a
shared compilation cache, and absl flags marked parsed, since pytest never
runs absl's main.
"""

import os
import tempfile

from tests import fixtures  # Standard library only: no JAX yet.

os.environ['XLA_FLAGS'] = ' '.join((
    os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8',
    fixtures.FAST_COMPILE_XLA_FLAGS))
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


# The test classes that take longest (seconds on 2 cores, from `--durations`
# in CI logs), slowest first. With `--dist loadscope --no-loadscope-reorder`
# (the README's test command) xdist hands out classes in collection order,
# so starting these first keeps both workers busy to the end instead of
# leaving one class of ~2 minutes running alone (xdist's own reordering
# puts classes with the most tests first, which sends these last). A class
# missing from the list runs after them in file order; a stale name is
# ignored.
_SLOWEST_FIRST = (
    'tests/benchmarks_test.py::BenchmarksTest',
    'tests/experiments_test.py::ExperimentsTest',
    'tests/train_test.py::SmokePipelineTest',
    'tests/decoding_test.py::DecodingTest',
    'tests/launch_test.py::LocalTest',
    'tests/train_test.py::TrainLoopTest',
    'tests/composition_test.py::CompositionTest',
    'tests/compose_test.py::ComposeTest',
    'tests/aligned_compose_test.py::AlignedComposeTest',
    'tests/kv_probes_test.py::KvProbesTest',
    'tests/humaneval_test.py::HumanEvalTest',
    'tests/notebook_test.py::NotebookTest',
)


def pytest_collection_modifyitems(items):
  rank = {scope: i for i, scope in enumerate(_SLOWEST_FIRST)}

  def key(item):
    scope = '::'.join(item.nodeid.split('::')[:2])
    return rank.get(scope, len(rank))

  items.sort(key=key)  # Stable: file order within each rank.
