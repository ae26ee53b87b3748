r"""calm_jax's CALM step against calm-pytorch's, on the same work, in one run.

  python benchmarks/versus_peer.py --config=peer --rounds=2 --steps=5

For each row of layer pairs (0-based `aug_layer:anchor_layer`), and each
round, this runs `train_step.py --modes=calm` and `peer_calm_pytorch.py`
one after the other, each in its own process with the same `--threads`,
the same shapes and the same pairs, alternating so that a noisy neighbour
slows both. It prints one JSON line per row and a markdown table:

  spread      every m_A layer, its anchor layer at the same relative depth
              (k = 1): the backward crosses most of the anchor
  paper       the paper's rule (k = 4): one pair at the anchor's last layer
              for a 4-layer m_A
  every       every anchor layer reads an m_A layer

Also, on the spread row: calm_jax's full fine-tune of the anchor
(`full_ft`, the yardstick of "CALM costs about 0.7x a fine-tune") and CALM
with m_A's states cached (`cache_augmenting`, work calm-pytorch has no way
to skip), and the spread row's matmuls each timed alone at their own shapes
(`train_step.py --dots_alone`): the step's time were everything else free.
MFU is the step's useful FLOPs (`train_step.useful_flops`, the
same count for both) over the best dense float32 matmul throughput either
framework measured in this run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

# `--config`, `--steps` and `--threads` are train_step.py's flags (one
# definition per name), forwarded to both scripts; its other flags are not
# used here. This script's directory is sys.path[0], whatever the cwd.
import train_step  # pylint: disable=g-import-not-at-top

_CONFIG = train_step._CONFIG  # pylint: disable=protected-access
_STEPS = train_step._STEPS  # pylint: disable=protected-access
_THREADS = train_step._THREADS  # pylint: disable=protected-access
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternating rounds per row.')
_ROWS = flags.DEFINE_list('rows', ['spread', 'paper', 'every'],
                          'Rows of pairs to compare.')

HERE = os.path.dirname(os.path.abspath(__file__))


def row_pairs(row: str, aug_layers: int, anchor_layers: int) -> str:
  """--pairs for a row name (see the module docstring)."""
  from calm_jax.models import composition  # pylint: disable=g-import-not-at-top
  if row == 'every':
    pairs = [(j * aug_layers // anchor_layers, j)
             for j in range(anchor_layers)]
  else:
    pairs = composition.select_pairs(aug_layers, anchor_layers,
                                     1 if row == 'spread' else 4)
  return ','.join(f'{i}:{j}' for i, j in pairs)


def _run(script: str, *args: str) -> list[dict]:
  cmd = [sys.executable, os.path.join(HERE, script), f'--config={_CONFIG.value}',
         f'--steps={_STEPS.value}', f'--threads={_THREADS.value}', *args]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return [json.loads(l) for l in out.stdout.splitlines()
          if l.startswith('{')]


def main(argv):
  del argv
  size = train_step.SIZES[_CONFIG.value]
  unknown = set(_ROWS.value) - {'spread', 'paper', 'every'}
  if unknown:
    raise app.UsageError(f'--rows: unknown {sorted(unknown)}; choose from '
                         'spread, paper, every.')
  results = []
  for row in _ROWS.value:
    pairs = row_pairs(row, size['aug']['num_layers'],
                      size['anchor']['num_layers'])
    runs: dict[str, list[dict]] = {}
    for _ in range(_ROUNDS.value):
      modes = 'calm,full_ft' if row == 'spread' else 'calm'
      # On the spread row also the step's own matmuls, each timed alone:
      # how close the step is to what XLA's dot kernels allow.
      dots = ('--dots_alone', '--dot_top=0') if row == 'spread' else ()
      for r in _run('train_step.py', f'--modes={modes}', f'--pairs={pairs}',
                    *dots):
        runs.setdefault(r['mode'], []).append(r)
      runs.setdefault('calm_pytorch', []).extend(
          _run('peer_calm_pytorch.py', f'--pairs={pairs}'))
      if row == 'spread':
        runs.setdefault('calm_cached', []).extend(_run(
            'train_step.py', '--modes=calm', '--cache_augmenting',
            f'--pairs={pairs}'))
    peak = max(r['peak_gflops'] for rs in runs.values() for r in rs)
    step = {m: statistics.median(r['step_s'] for r in rs)
            for m, rs in runs.items()}
    flops = {m: rs[0]['useful_gflop'] for m, rs in runs.items()}
    line = {
        'row': row, 'pairs': pairs, 'config': _CONFIG.value,
        'threads': _THREADS.value, 'rounds': _ROUNDS.value,
        'calm_jax_step_s': [r['step_s'] for r in runs['calm']],
        'calm_pytorch_step_s': [r['step_s'] for r in runs['calm_pytorch']],
        'ratio_tokens_per_s': round(step['calm_pytorch'] / step['calm'], 3),
        'peak_gflops': peak,
        'mfu_calm_jax': round(flops['calm'] / step['calm'] / peak, 3),
        'mfu_calm_pytorch': round(
            flops['calm_pytorch'] / step['calm_pytorch'] / peak, 3),
        'trainable_params': {m: rs[0]['trainable_params']
                             for m, rs in runs.items()},
    }
    if 'full_ft' in step:
      line['full_ft_step_s'] = [r['step_s'] for r in runs['full_ft']]
      line['calm_over_full_ft'] = round(step['calm'] / step['full_ft'], 3)
    if 'dots_alone_s' in runs['calm'][0]:
      for m in ('calm', 'full_ft'):
        alone = statistics.median(r['dots_alone_s'] for r in runs[m])
        line[f'{m}_dots_alone_s'] = [r['dots_alone_s'] for r in runs[m]]
        line[f'{m}_step_over_dots_alone'] = round(step[m] / alone, 3)
        line[f'{m}_dot_bound_mfu'] = round(flops[m] / alone / peak, 3)
    if 'calm_cached' in step:
      line['calm_cached_step_s'] = [r['step_s'] for r in runs['calm_cached']]
      line['ratio_cached_tokens_per_s'] = round(
          step['calm_pytorch'] / step['calm_cached'], 3)
    print(json.dumps(line), flush=True)
    results.append(line)

  print('\n| pairs (aug:anchor, 0-based) | calm_jax s/step | calm-pytorch '
        's/step | calm_jax / calm-pytorch tokens/s | MFU calm_jax | MFU '
        'calm-pytorch |\n|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['row']}: {r['pairs']} | "
          f"{', '.join(map(str, r['calm_jax_step_s']))} | "
          f"{', '.join(map(str, r['calm_pytorch_step_s']))} | "
          f"**{r['ratio_tokens_per_s']}x** | {r['mfu_calm_jax']} | "
          f"{r['mfu_calm_pytorch']} |")
  for r in results:
    if 'calm_over_full_ft' in r:
      print(f"\n{r['row']}: full fine-tune {r['full_ft_step_s']} s/step; "
            f"CALM / full fine-tune = {r['calm_over_full_ft']}x. CALM with "
            f"m_A's states cached: {r['calm_cached_step_s']} s/step, "
            f"{r['ratio_cached_tokens_per_s']}x calm-pytorch's tokens/s.")
  for r in results:
    if 'calm_dots_alone_s' in r:
      print(f"\n{r['row']}: calm_jax's CALM step is "
            f"{r['calm_step_over_dots_alone']}x its own matmuls each timed "
            f"alone ({r['calm_dots_alone_s']} s), the full fine-tune's "
            f"{r['full_ft_step_over_dots_alone']}x; "
            f"were everything but those matmuls free, MFU would be "
            f"{r['calm_dot_bound_mfu']} (CALM) and "
            f"{r['full_ft_dot_bound_mfu']} (full fine-tune).")
  print(f"\nMFU against {max(r['peak_gflops'] for r in results)} GFLOP/s, "
        'the best dense float32 matmul either framework measured here.')


if __name__ == '__main__':
  app.run(main)
