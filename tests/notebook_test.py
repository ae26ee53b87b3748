"""The Colab demo notebook runs headless at smoke size."""

import os

from absl.testing import absltest

from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import nbclient
  import nbformat
except ImportError:
  nbclient = nbformat = None


@absltest.skipIf(nbclient is None, 'needs the test extra (nbclient)')
class NotebookTest(absltest.TestCase):

  def test_demo_runs(self):
    path = os.path.join(ROOT, 'notebooks', 'calm_demo.ipynb')
    nb = nbformat.read(path, as_version=4)
    workdir = self.create_tempdir().full_path
    env = dict(os.environ, SMOKE='1', XLA_FLAGS=fixtures.ONE_DEVICE_XLA_FLAGS,
               CALM_NOTEBOOK_WORKDIR=workdir)
    old = dict(os.environ)
    os.environ.update(env)
    try:
      client = nbclient.NotebookClient(
          nb, timeout=600, kernel_name='python3',
          resources={'metadata': {'path': ROOT}})
      client.execute()
    finally:
      os.environ.clear()
      os.environ.update(old)
    outputs = ''.join(o.get('text', '') for c in nb.cells
                      for o in c.get('outputs', []))
    self.assertIn('| calm |', outputs)
    # compose() starts as the anchor.
    self.assertRegex(outputs, r'max \|logit difference\| = 0\.0\b')
    images = [o for c in nb.cells for o in c.get('outputs', [])
              if 'image/png' in o.get('data', {})]
    self.assertLen(images, 2)  # The loss curve and the attention map.


if __name__ == '__main__':
  absltest.main()
