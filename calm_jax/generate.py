r"""Stream a completion from an anchor, augmenting models and a composition.

  python -m calm_jax.generate --anchor=WORKDIR/models/anchor \
      --augmenting=kv=WORKDIR/models/aug_kv \
      --composition=WORKDIR/runs/calm/seed_0/checkpoints \
      --prompt='abc+de-fgh=' --max_new_tokens=32

Models are calm_jax model directories or Hugging Face checkpoints. The
composition is a training run's checkpoint directory (its latest step);
its layer pairs and head count are read from the parameter names and
shapes. Without --composition the anchor alone generates.
"""

import os
import sys

from absl import app
from absl import flags
import jax

from calm_jax import checkpoints
from calm_jax import decoding
from calm_jax.data import tokenizers
from calm_jax.models import composition as composition_lib
from calm_jax.models import transformer

_ANCHOR = flags.DEFINE_string('anchor', None, 'Anchor model directory.')
_AUG = flags.DEFINE_list('augmenting', [], 'NAME=PATH of each augmenting '
                         'model, as named when the composition was trained.')
_COMPOSITION = flags.DEFINE_string('composition', None, 'Checkpoint '
                                   'directory of a trained composition.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to complete.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', 'byte', "A calm_jax tokenizer name, or a directory with a "
    "Hugging Face tokenizer.json.")
_PROMPT_ONLY = flags.DEFINE_bool('prompt_only', False, 'The composition was '
                                 'trained with m_A reading the prompt only.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, '1: off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['anchor', 'prompt'])


def main(argv):
  del argv
  if os.path.isdir(_TOKENIZER.value):
    from calm_jax import hf_import
    tok = hf_import.HFTokenizer(_TOKENIZER.value)
  else:
    tok = tokenizers.get_tokenizer(_TOKENIZER.value)
  anchor_cfg, anchor = checkpoints.load_model(_ANCHOR.value, '--anchor')
  if not _COMPOSITION.value:
    model, params, kw = transformer.Decoder(anchor_cfg), anchor, {}
  else:
    try:
      comp, pairs = checkpoints.load_composition(_COMPOSITION.value)
    except ValueError as e:
      raise app.UsageError(f'--composition: {e}') from e
    paths = dict(a.split('=', 1) for a in _AUG.value)
    if sorted(paths) != sorted(pairs):
      raise app.UsageError(f'--augmenting must name {sorted(pairs)} (the '
                           f'composition was trained with them); got '
                           f'{sorted(paths)}.')
    augmenting, params = [], {'anchor': anchor, 'composition': comp}
    for name in sorted(pairs):
      cfg, params[f'aug_{name}'] = checkpoints.load_model(
          paths[name], f'--augmenting {name}')
      if cfg.vocab_size != anchor_cfg.vocab_size:
        raise app.UsageError(
            f'--augmenting {name} has vocabulary {cfg.vocab_size} but the '
            f'anchor has {anchor_cfg.vocab_size}; they cannot compose.')
      augmenting.append(composition_lib.Augmenting(
          name, cfg, tuple(sorted(pairs[name]))))
    model = composition_lib.ComposedLM(
        anchor_cfg, tuple(augmenting), prompt_only=_PROMPT_ONLY.value,
        **composition_lib.bridge_options(comp))
    kw = None
  prompt = [tok.bos_id] + tok.encode(_PROMPT.value)
  if len(prompt) + _MAX_NEW.value > anchor_cfg.max_len:
    raise app.UsageError(
        f'--max_new_tokens={_MAX_NEW.value}: the prompt ({len(prompt)} '
        f'tokens with BOS) and the new tokens exceed the anchor\'s max_len='
        f'{anchor_cfg.max_len}; use --max_new_tokens='
        f'{max(anchor_cfg.max_len - len(prompt), 0)} or less.')
  if kw is None:
    import numpy as np
    kw = {'prompt_len': np.array([len(prompt)], np.int32)}
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
  app.run(main)
