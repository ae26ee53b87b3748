r"""Stream a completion from a trained composition, or from one model.

  python -m calm_jax.generate --composition=WORKDIR/runs/calm/seed_0 \
      --prompt='abc+de-fgh=' --max_new_tokens=32

The composition's run directory holds `composition.json`, which names the
frozen models, the layer pairs, the bridge options and the tokenizer: no
other flag is needed. `--anchor`, `--augmenting=NAME=PATH` and
`--tokenizer` may replace the recorded ones, but only with the same models
(their fingerprints are checked); `--prompt_only` and `--step` (default: the
latest checkpoint) override what was recorded.

Without --composition, `--anchor` (a calm_jax model directory or a Hugging
Face checkpoint) generates alone, with `--tokenizer` or the one the model
directory holds or records.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

from calm_jax import checkpoints
from calm_jax import config_lib
from calm_jax import compositions
from calm_jax import decoding
from calm_jax import logs
from calm_jax.data import tokenizers
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

_COMPOSITION = flags.DEFINE_string(
    'composition', None, 'Run directory of a trained composition '
    '(WORKDIR/runs/ROW/seed_S, holding composition.json).')
_ANCHOR = flags.DEFINE_string('anchor', None, 'Anchor model directory '
                              '(default: the recorded one).')
_AUG = flags.DEFINE_list('augmenting', [], 'NAME=PATH of augmenting models '
                         'that replace the recorded ones.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "A calm_jax tokenizer name ('byte', 'char'), or a "
    'directory with tokenizer.json / tokenizer.model (default: the '
    "composition's, or the anchor's).")
_PROMPT_ONLY = flags.DEFINE_bool(
    'prompt_only', None, 'm_A reads the prompt only (default: as trained).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the '
                             'latest).')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to complete.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, '1: off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['prompt'])


def _check_flags() -> dict[str, str]:
  """The flags' own errors, before any model is read."""
  if _TEMPERATURE.value < 0:
    raise ValueError(f'--temperature={_TEMPERATURE.value} must be >= 0 '
                         '(0: greedy).')
  if _TOP_K.value < 0:
    raise ValueError(f'--top_k={_TOP_K.value} must be >= 0 (0: off).')
  if not 0.0 < _TOP_P.value <= 1.0:
    raise ValueError(f'--top_p={_TOP_P.value} must be in (0, 1] '
                         '(1: off).')
  if _MAX_NEW.value <= 0:
    raise ValueError(f'--max_new_tokens={_MAX_NEW.value} must be '
                         'positive.')
  if _STEP.value is not None and _STEP.value < 0:
    raise ValueError(f'--step={_STEP.value} must be >= 0 (unset: the '
                     'latest checkpoint).')
  augmenting = {}
  for item in _AUG.value:
    if '=' not in item:
      raise ValueError(f'--augmenting={item!r}: give NAME=PATH, e.g. '
                           f'--augmenting=aug={item}.')
    name, path = item.split('=', 1)
    if not os.path.isdir(path):
      raise ValueError(f'--augmenting={item!r}: {path!r} is not a model '
                       'directory.')
    augmenting[name] = path
  if not _COMPOSITION.value and not _ANCHOR.value:
    raise ValueError('--composition: give a trained run directory '
                     '(WORKDIR/runs/ROW/seed_S), or --anchor for a model '
                     'to generate with alone.')
  if _COMPOSITION.value and not os.path.isdir(_COMPOSITION.value):
    raise ValueError(f'--composition={_COMPOSITION.value!r} is not a '
                         'directory; give WORKDIR/runs/ROW/seed_S.')
  if _ANCHOR.value and not os.path.isdir(_ANCHOR.value):
    raise ValueError(f'--anchor={_ANCHOR.value!r} is not a model '
                     'directory.')
  if _TOKENIZER.value:
    tok = tokenizers.get_tokenizer(_TOKENIZER.value, field='--tokenizer')
    if _ANCHOR.value:
      # The ids must be the ones the anchor was trained on.
      try:
        config_lib.check_model_tokenizer(tok, _ANCHOR.value, '--anchor')
      except ValueError as e:
        raise ValueError(f'--tokenizer={_TOKENIZER.value!r}: {e}') from None
  return augmenting


def _model_tokenizer(path: str):
  """The tokenizer a model directory holds or records."""
  if tokenizers.has_tokenizer(path):
    return tokenizers.checkpoint_tokenizer(path, '--anchor')
  record = checkpoints.read_model_json(path).get('tokenizer')
  if record:
    return tokenizers.get_tokenizer(record['spec'])
  return tokenizers.get_tokenizer('byte')  # Older calm_jax models.


def _legacy(augmenting: dict[str, str]):
  """A checkpoints folder of a run that predates composition.json."""
  if compositions.runs_below(_COMPOSITION.value):
    raise ValueError(
        f'--composition: {compositions.not_found(_COMPOSITION.value)}')
  if not _ANCHOR.value:
    raise ValueError(
        f'--composition: {_COMPOSITION.value} holds no {compositions.FILE} '
        '(a run of an older calm_jax); give --anchor, --augmenting and '
        '--tokenizer.')
  anchor_cfg, anchor = checkpoints.load_model(_ANCHOR.value, '--anchor')
  comp, pairs = checkpoints.load_composition(_COMPOSITION.value,
                                             step=_STEP.value)
  if sorted(augmenting) != sorted(pairs):
    raise ValueError(f'--augmenting must name {sorted(pairs)} (the '
                         f'composition was trained with them); got '
                         f'{sorted(augmenting)}.')
  aug, params = [], {'anchor': anchor, 'composition': comp}
  for name in sorted(pairs):
    cfg, params[f'aug_{name}'] = checkpoints.load_model(
        augmenting[name], f'--augmenting {name}')
    aug.append(composition_lib.Augmenting(name, cfg,
                                          tuple(sorted(pairs[name]))))
  model = composition_lib.ComposedLM(
      anchor_cfg, tuple(aug), prompt_only=bool(_PROMPT_ONLY.value),
      bridge=composition_lib.bridge_config_of(comp))
  tok = (tokenizers.get_tokenizer(_TOKENIZER.value) if _TOKENIZER.value
         else _model_tokenizer(_ANCHOR.value))
  return model, params, tok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  logs.run_reporting_errors(_generate)


def _generate():
  """Everything main does; bad flags or models are one FATAL line."""
  augmenting = _check_flags()
  if not _COMPOSITION.value:
    anchor_cfg, params = checkpoints.load_model(_ANCHOR.value, '--anchor')
    model = transformer.Decoder(anchor_cfg)
    tok = (tokenizers.get_tokenizer(_TOKENIZER.value) if _TOKENIZER.value
           else _model_tokenizer(_ANCHOR.value))
  elif compositions.find(_COMPOSITION.value) is None:
    model, params, tok = _legacy(augmenting)
  else:
    model, params, tok, info = compositions.load(
        _COMPOSITION.value, anchor=_ANCHOR.value, augmenting=augmenting,
        tokenizer=_TOKENIZER.value, step=_STEP.value)
    if _PROMPT_ONLY.value is not None:
      model = model.clone(prompt_only=_PROMPT_ONLY.value)
    if model.aligned:
      # Each augmenting model reads the text in its own tokenizer: the
      # aligned decoder re-tokenizes as the text grows (no token stream).
      from calm_jax import aligned_decoding  # Deferred: aligned only.
      out = aligned_decoding.generate(
          model, params, [_PROMPT.value], anchor_tokenizer=tok,
          aug_tokenizers=info['aug_tokenizers'],
          max_new_tokens=_MAX_NEW.value, rng=jax.random.key(_SEED.value),
          temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
          top_p=_TOP_P.value)
      sys.stdout.write(_PROMPT.value + out['texts'][0] + '\n')
      return
  composed = isinstance(model, composition_lib.ComposedLM)
  max_len = decoding.max_len_of(model)
  prompt = [tok.bos_id] + tok.encode(_PROMPT.value)
  if len(prompt) + _MAX_NEW.value > max_len:
    raise ValueError(
        f'--max_new_tokens={_MAX_NEW.value}: the prompt ({len(prompt)} '
        f'tokens with BOS) and the new tokens exceed the anchor\'s max_len='
        f'{max_len}; use --max_new_tokens='
        f'{max(max_len - len(prompt), 0)} or less.')
  kw = {'prompt_len': np.array([len(prompt)], np.int32)} if composed else {}
  sys.stdout.write(_PROMPT.value)
  out = []
  for t in decoding.stream(
      model, params, prompt, max_new_tokens=_MAX_NEW.value,
      rng=jax.random.key(_SEED.value), temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, top_p=_TOP_P.value, eos_id=tok.eos_id,
      model_kwargs=kw):
    out.append(t)
    # Print whole characters as soon as their bytes are complete.
    text = tok.decode(out)
    if not text.endswith('\ufffd'):
      sys.stdout.write(text)
      sys.stdout.flush()
      out = []
  sys.stdout.write(tok.decode(out) + '\n')


if __name__ == '__main__':
  app.run(main, flags_parser=logs.parse_flags)
