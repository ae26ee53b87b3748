"""Layers import downwards only: models <- tasks <- rows <- train <- main.

Read from the source with `ast` (nothing is imported), at module level and
inside functions alike, so a deferred import cannot hide a cycle.
"""

import ast
import os

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'calm_jax')

# module -> calm_jax modules it must not import (directly).
FORBIDDEN = {
    'models': ('tasks', 'rows', 'train', 'main', 'config_lib', 'data',
               'checkpoints', 'evaluation', 'compositions', 'api'),
    'data': ('models', 'tasks', 'rows', 'train', 'main', 'config_lib',
             'checkpoints', 'evaluation', 'compositions', 'api'),
    'checkpoints': ('config_lib', 'tasks', 'rows', 'train', 'main', 'data'),
    'tasks': ('rows', 'train', 'main', 'config_lib', 'evaluation'),
    'evaluation': ('rows', 'train', 'main', 'config_lib'),
    'compositions': ('rows', 'train', 'main', 'config_lib', 'tasks'),
    'rows': ('train', 'main', 'config_lib'),
    'config_lib': ('rows', 'train', 'main', 'evaluation', 'tasks',
                   'data.pipeline', 'data.inputs'),
}


def _imports(path):
  """calm_jax modules `path` imports, as dotted names below calm_jax."""
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'calm_jax':
        out.update(a.name for a in node.names)
      elif node.module.startswith('calm_jax.'):
        sub = node.module[len('calm_jax.'):]
        out.add(sub)
        out.update(f'{sub}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name[len('calm_jax.'):] for a in node.names
                 if a.name.startswith('calm_jax.'))
  return out


def _modules():
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), PACKAGE)[:-3]
        yield rel.replace(os.sep, '.').removesuffix('.__init__'), os.path.join(
            dirpath, f)


class LayeringTest(absltest.TestCase):

  def test_no_module_imports_a_layer_above_it(self):
    checked = 0
    for name, path in _modules():
      rules = [bad for layer, bad in FORBIDDEN.items()
               if name == layer or name.startswith(layer + '.')]
      for bad in rules:
        checked += 1
        for imported in _imports(path):
          for b in bad:
            with self.subTest(module=name, imports=imported):
              self.assertFalse(
                  imported == b or imported.startswith(b + '.'),
                  f'calm_jax.{name} imports calm_jax.{imported}, a layer '
                  'above it')
    self.assertGreater(checked, 10)

  def test_nothing_imports_the_entry_points(self):
    for name, path in _modules():
      for entry in ('main', 'generate'):
        if name != entry:
          self.assertNotIn(entry, _imports(path), name)


if __name__ == '__main__':
  absltest.main()
