r"""The cost of composing models with different tokenizers.

Compares, on the same anchor, augmenting architecture, bridges and texts:

  shared    m_A reads the anchor's ids (bytes), composition.align='none';
  aligned   m_A reads its own byte-level BPE (trained here on the same
            texts), the streams aligned by characters (align='chars'), its
            rows `--aug_seq_len` tokens long.

and prints one JSON line per measurement, medians over `--repeats`:

  train_step  s per jitted CALM step (forward, backward into the bridges,
              AdamW-free: the gradient only), batch x seq_len anchor tokens;
  rows        host s per batch to tokenize and build the rows (the
              pipeline's encode_example, with the aligned streams or not);
  decode      s per decoding step of the batch (one new token per row):
              `decoding.generate` (shared, one jitted loop) against
              `aligned_decoding.generate` (aligned: a host loop that
              re-tokenizes each step);

and the ratios aligned / shared of the train step and the decode step.

  python benchmarks/align_cost.py --threads=2

Texts: docstrings of the interpreter's standard library, cut into rows.
Weights are random (the cost does not depend on them).
"""

import os

from absl import app
from absl import flags

# This script's directory is sys.path[0] when it runs: process.py is its
# neighbour, whatever the working directory.
import process  # pylint: disable=g-import-not-at-top

_THREADS = flags.DEFINE_integer('threads', 2, 'CPU cores the run may use.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows per batch.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Anchor tokens (bytes) per row.')
_AUG_SEQ = flags.DEFINE_integer(
    'aug_seq_len', 0, "m_A tokens per aligned row (0: seq_len, the "
    "pipeline's default).")
_VOCAB = flags.DEFINE_integer('bpe_vocab', 1024, "m_A's BPE size.")
_NEW = flags.DEFINE_integer('new_tokens', 32, 'Tokens decoded per row.')


_MODULES = ('argparse', 'ast', 'asyncio', 'bisect', 'collections', 'contextlib',
            'copy', 'csv', 'dataclasses', 'datetime', 'decimal', 'difflib',
            'email', 'enum', 'fractions', 'functools', 'hashlib', 'heapq',
            'http.client', 'inspect', 'io', 'itertools', 'json', 'logging',
            'os', 'pathlib', 'pickle', 'pprint', 're', 'shutil', 'socket',
            'sqlite3', 'statistics', 'string', 'subprocess', 'tarfile',
            'tempfile', 'textwrap', 'threading', 'typing', 'unittest',
            'urllib.parse', 'zipfile')


def _texts(n: int, chars: int) -> list[str]:
  """n ASCII texts of about `chars` characters: docstrings of standard
  library modules and their members."""
  import importlib
  import inspect
  out, buf = [], ''
  for name in _MODULES:
    mod = importlib.import_module(name)
    for obj in [mod] + [getattr(mod, k) for k in sorted(dir(mod))
                        if not k.startswith('_')]:
      doc = inspect.getdoc(obj) if callable(obj) or obj is mod else None
      if not doc:
        continue
      buf += ' '.join(doc.encode('ascii', 'ignore').decode().split()) + ' '
      while len(buf) > chars:
        cut = buf.rfind(' ', 0, chars)
        out.append(buf[:cut])
        buf = buf[cut + 1:]
        if len(out) == n:
          return out
  return out


def main(argv):
  del argv
  process.setup(_THREADS.value)
  import json
  import statistics
  import tempfile
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from calm_jax import aligned_decoding
  from calm_jax import decoding
  from calm_jax import tasks
  from calm_jax.data import align
  from calm_jax.data import bpe
  from calm_jax.data import pipeline
  from calm_jax.data import tokenizers
  from calm_jax.models import composition
  from calm_jax.models import transformer

  seq, b = _SEQ.value, _BATCH.value
  aug_seq = _AUG_SEQ.value or seq
  byte = tokenizers.get_tokenizer('byte')
  corpus = _texts(400, seq - 40)
  bpe_tok = tokenizers.get_tokenizer(bpe.train(
      corpus, os.path.join(tempfile.mkdtemp(), 'bpe'), _VOCAB.value))
  # Prompt/target examples: the first 32 characters are the prompt.
  examples = [{'prompt': t[:32], 'target': t[32:]} for t in corpus]

  anchor = transformer.DecoderConfig(
      vocab_size=259, d_model=256, num_layers=4, num_heads=4, d_ff=1024,
      max_len=seq + _NEW.value)
  arch = dict(d_model=128, num_layers=4, num_heads=4, d_ff=512)
  runs = {
      'shared': (transformer.DecoderConfig(vocab_size=259, max_len=seq +
                                           _NEW.value, **arch), 'none',
                 byte),
      'aligned': (transformer.DecoderConfig(
          vocab_size=bpe_tok.vocab_size, max_len=max(aug_seq, seq) +
          _NEW.value, **arch), 'chars', bpe_tok),
  }

  def median_time(fn, repeats):
    fn()  # Compile / warm up.
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  def emit(**kw):
    print(json.dumps(kw), flush=True)

  found = {}
  for mode, (aug_cfg, align_mode, aug_tok) in runs.items():
    aug = (composition.Augmenting('m', aug_cfg, ((1, 1), (3, 3))),)
    model = composition.ComposedLM(anchor, aug, align=align_mode)
    kw = ({'aligned': {'m': aug_tok}, 'aug_seq_len': aug_seq}
          if align_mode == 'chars' else {})
    # Rows: tokenizing and aligning on the host.
    chunk = examples[:b]
    build = lambda: [pipeline.encode_example(ex, byte, seq, **kw)
                     for ex in chunk]
    rows_s = median_time(build, _REPEATS.value)
    rows = build()
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows]))
             for k in rows[0]}
    params = jax.jit(lambda r: model.init(
        r, batch['inputs'], aug_inputs=align.model_inputs(batch)))(
            jax.random.key(0))['params']
    comp, frozen = params['composition'], {
        k: v for k, v in params.items() if k != 'composition'}

    @jax.jit
    def step(comp, batch):
      def loss(c):
        logits = tasks.composed_apply(model, {**frozen, 'composition': c},
                                      batch)
        return tasks.weighted_xent(logits, batch)[0]
      return jax.grad(loss)(comp)

    step_s = median_time(
        lambda: jax.block_until_ready(step(comp, batch)), _REPEATS.value)
    emit(mode=mode, what='train_step', s=round(step_s, 4), batch=b,
         seq_len=seq, aug_seq_len=aug_seq if align_mode == 'chars' else seq,
         aug_tokens_real=int(sum(int((r[align.key('m', 'inputs')] !=
                                      aug_tok.pad_id).sum()) for r in rows))
         if align_mode == 'chars' else int(sum(
             int((r['inputs'] != byte.pad_id).sum()) for r in rows)))
    found[mode, 'train_step'] = step_s
    emit(mode=mode, what='rows', s_per_batch=round(rows_s, 5), batch=b)

    # Decoding: the batch's prompts, `new_tokens` each, no early stop.
    params = {**frozen, 'composition': jax.tree_util.tree_map(
        lambda x: x + 0.01, comp)}
    prompts = [ex['prompt'] for ex in chunk]
    n = _NEW.value
    if align_mode == 'none':
      ids = [[byte.bos_id] + byte.encode(p) for p in prompts]
      width = max(map(len, ids))
      arr = np.zeros((b, width), np.int32)
      for i, r in enumerate(ids):
        arr[i, :len(r)] = r
      plen = np.array([len(r) for r in ids], np.int32)
      run = lambda: jax.block_until_ready(decoding.generate(
          model, params, arr, plen, max_new_tokens=n, eos_id=-1,
          model_kwargs={'prompt_len': plen})['new_tokens'])
      steps = n
    else:
      run = lambda: aligned_decoding.generate(
          model, params, prompts, anchor_tokenizer=byte,
          aug_tokenizers={'m': aug_tok}, max_new_tokens=n)
      # A row stops at EOS (random weights may write one): count steps.
      steps = max(len(t) for t in run()['new_tokens'])
    dec_s = median_time(run, max(1, _REPEATS.value // 2))
    emit(mode=mode, what='decode', s_per_step=round(dec_s / steps, 5),
         batch=b, steps=steps)
    found[mode, 'decode'] = dec_s / steps

  emit(what='ratio aligned/shared',
       train_step=round(found['aligned', 'train_step'] /
                        found['shared', 'train_step'], 2),
       decode_step=round(found['aligned', 'decode'] /
                         found['shared', 'decode'], 2))


if __name__ == '__main__':
  app.run(main)
