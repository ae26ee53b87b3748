"""Data layer: tokenizers, the key-value arithmetic task, grain pipelines."""

from calm_jax.data.kv_arithmetic import EVAL_SPLITS
from calm_jax.data.kv_arithmetic import KvArithmetic
from calm_jax.data.kv_arithmetic import KvArithmeticConfig
from calm_jax.data.kv_arithmetic import make_config
from calm_jax.data.kv_arithmetic import max_example_chars
from calm_jax.data.kv_arithmetic import prepare
from calm_jax.data.kv_arithmetic import SPLITS
from calm_jax.data.kv_arithmetic import TRAIN_SPLITS
from calm_jax.data.pipeline import encode_example
from calm_jax.data.pipeline import eval_batches
from calm_jax.data.pipeline import make_source
from calm_jax.data.pipeline import train_dataset
from calm_jax.data.tokenizers import ByteTokenizer
from calm_jax.data.tokenizers import get_tokenizer
from calm_jax.data.tokenizers import Tokenizer
from calm_jax.data.tokenizers import record as tokenizer_record
from calm_jax.data.inputs import CACHED
from calm_jax.data.inputs import Data
from calm_jax.data.inputs import MODEL_KEYS
from calm_jax.data.inputs import split_names
from calm_jax.data.inputs import model_inputs
from calm_jax.data.inputs import TrainData
from calm_jax.data.inputs import validate_config
