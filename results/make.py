r"""Writes results/<name>.md from a finished workdir, or rewrites them all.

  python results/make.py --workdir=W --name=kv_arithmetic
  python results/make.py            # Every results/*.json again.

From a workdir it copies `results.json` (with the workdir's `run.json`:
command, git revision, machine) to `results/<name>.json` and `results.png`
to `results/<name>.png`; every `results/<name>.md` is then made from those
two files alone: the command, the revision, the table and the plot. Nothing
in results/ is typed by hand.
"""

import glob
import json
import os
import shutil

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', '', 'A finished calm_jax workdir.')
_NAME = flags.DEFINE_string('name', '', 'The results file name, e.g. '
                            'kv_arithmetic (with --workdir).')
HERE = os.path.dirname(os.path.abspath(__file__))


def write_md(name: str) -> str:
  from calm_jax import evaluation  # pylint: disable=g-import-not-at-top
  with open(os.path.join(HERE, f'{name}.json')) as f:
    saved = json.load(f)
  run, results = saved['run'], saved['results']
  lines = [f'# {name}', '', 'Made by', '', '```bash', run['command'], '```',
           '',
           f"at git revision `{run.get('git') or 'unknown'}` on "
           f"{run.get('date', '?')} ({run.get('devices', '?')}, "
           f"{run.get('cpu_count', '?')} CPU cores"
           + (f", {run['total_min']} min in all" if 'total_min' in run
              else '') + ').', '',
           *([f'Its runs did not all run the same code: '
              f'{len(set(run["code_versions"].values()))} versions '
              '(`code_versions` in the JSON: revision/uncommitted diff '
              'per run).', '']
             if len(set(run.get('code_versions', {}).values())) > 1
             else []),
           evaluation.format_table(results), '']
  if os.path.exists(os.path.join(HERE, f'{name}.png')):
    lines += [f'![{name}]({name}.png)', '']
  lines += ['(Regenerate with `python results/make.py`; numbers come from '
            f'`results/{name}.json`.)', '']
  path = os.path.join(HERE, f'{name}.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKDIR.value:
    if not _NAME.value:
      raise app.UsageError('--workdir needs --name, e.g. --name=kv_arithmetic.')
    w = _WORKDIR.value
    for needed in ('results.json', 'run.json'):
      if not os.path.exists(os.path.join(w, needed)):
        raise app.UsageError(f'--workdir={w!r} has no {needed}; give a '
                             'finished calm_jax workdir.')
    with open(os.path.join(w, 'results.json')) as f:
      results = json.load(f)
    with open(os.path.join(w, 'run.json')) as f:
      run = json.load(f)
    with open(os.path.join(HERE, f'{_NAME.value}.json'), 'w') as f:
      json.dump({'run': run, 'results': results}, f, indent=1)
    if os.path.exists(os.path.join(w, 'results.png')):
      shutil.copy(os.path.join(w, 'results.png'),
                  os.path.join(HERE, f'{_NAME.value}.png'))
    names = [_NAME.value]
  else:
    names = sorted(os.path.basename(p)[:-5]
                   for p in glob.glob(os.path.join(HERE, '*.json')))
  for name in names:
    print(write_md(name))


if __name__ == '__main__':
  app.run(main)
