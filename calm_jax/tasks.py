"""What one training run trains: a `Task`, and the tasks of every row kind.

A task is a model, the frozen part of its parameters, an init of the
trainable part, and `loss_fn(params, batch) -> (loss, metrics)`, which the
training loop differentiates with respect to the trainable part only:

  decoder_task      a plain LM from scratch (pretraining); all trainable
  composition_task  CALM: anchor and augmenting models frozen, bridges train
  lora_task         LoRA adapters on the frozen anchor
  full_ft_task      the anchor's own weights

The loss is the mean next-token cross-entropy over weighted positions
(`token_nll`, also what evaluation reports); a row's extra loss terms (the
composition's write penalty) live in its task's `loss_fn`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax import aug_cache
from calm_jax.data import align as align_lib
from calm_jax.models import composition as composition_lib
from calm_jax.models import lora as lora_lib
from calm_jax.models import transformer

Params = Any
Batch = dict[str, jax.Array]


# =================================================================== loss


def token_nll(logits: jax.Array, batch: Batch
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed nll, summed correct, summed weight) over weighted positions."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  w = batch['weights']
  correct = (argmax(logits) == batch['targets']).astype(jnp.float32)
  return (nll * w).sum(), (correct * w).sum(), w.sum()


@functools.lru_cache(maxsize=None)
def nll_program(model: nn.Module, composed: bool
                ) -> Callable[[Params, Batch], tuple[jax.Array, ...]]:
  """Jitted `(all params, batch) -> (*token_nll, hits)` of a plain or
  composed LM, `hits` [b, t] where the argmax is the target token.

  One program per model (modules are hashable), shared by the training
  loop's evals and the table's scoring: a trained row is then scored
  without tracing its model again. `hits` is what exact match reads
  (calm_jax/evaluation.py); the training loop's evals drop it.
  """
  apply = model_apply(model, composed)
  return jax.jit(lambda params, batch: nll_and_hits(apply(params, batch),
                                                    batch))


def nll_and_hits(logits: jax.Array, batch: Batch) -> tuple[jax.Array, ...]:
  """`token_nll`, and `hits` [b, t]: where the argmax is the target."""
  return (*token_nll(logits, batch), argmax(logits) == batch['targets'])


def argmax(logits: jax.Array) -> jax.Array:
  """`logits.argmax(-1)` (the first maximum), as two plain reductions.

  XLA's CPU backend runs argmax as one variadic (value, index) reduction
  that does not vectorise: 1.9 ms of a 36 ms step for [32, 16, 771]
  logits, against 0.35 ms for a max and a min over the positions holding
  it (docs/research/performance.md).
  """
  top = logits.max(-1, keepdims=True)
  ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(logits == top, ids, logits.shape[-1]), -1)


def weighted_xent(logits: jax.Array, batch: Batch
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over weighted positions, and accuracy."""
  nll, correct, weight = token_nll(logits, batch)
  denom = jnp.maximum(weight, 1.0)
  return nll / denom, {'accuracy': correct / denom, 'weight': weight}


# ================================================================== tasks


@dataclasses.dataclass(frozen=True)
class Task:
  """What one training run trains: a model, its frozen part, its init."""
  name: str
  model: nn.Module
  apply: Callable[[Params, Batch], jax.Array]  # (all params, batch) -> logits.
  init_trainable: Callable[[jax.Array], Params]  # rng -> boxed params.
  frozen: Params  # Placed on the mesh; {} when everything trains.
  # (all params, batch) -> (loss, metrics with at least `xent` and
  # `accuracy`); None: the cross-entropy of `apply`'s logits.
  loss: Callable[[Params, Batch], tuple[jax.Array, dict[str, jax.Array]]
                 ] | None = None
  # `apply` is `model_apply(model, composed)`, so its evals can run
  # `nll_program(model, composed)`; None: another `apply`.
  composed: bool | None = None

  def loss_fn(self, params: Params, batch: Batch
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of `params` (frozen and trainable) on `batch`."""
    if self.loss is not None:
      return self.loss(params, batch)
    loss, aux = weighted_xent(self.apply(params, batch), batch)
    return loss, {'xent': loss, 'accuracy': aux['accuracy']}


def decoder_apply(model: nn.Module, params: Params, batch: Batch
                  ) -> jax.Array:
  """A plain LM's logits on a batch (padded or packed rows)."""
  return model.apply({'params': params}, batch['inputs'],
                     positions=batch.get('positions'),
                     segment_ids=batch.get('segment_ids'))


def model_apply(model: nn.Module, composed: bool
                ) -> Callable[[Params, Batch], jax.Array]:
  """`(all params, batch) -> logits` of a plain (`composed` False) or a
  composed LM: what `Task.apply` is for every task but LoRA's."""
  return functools.partial(composed_apply if composed else decoder_apply,
                           model)


def decoder_task(name: str, config: transformer.DecoderConfig) -> Task:
  """A plain LM trained from scratch: everything trainable."""
  model = transformer.Decoder(config)
  return Task(
      name=name, model=model, frozen={}, composed=False,
      apply=model_apply(model, False),
      init_trainable=lambda r: model.init(
          r, jnp.zeros((1, 8), jnp.int32))['params'])


def composed_apply(model: composition_lib.ComposedLM, params: Params,
                   batch: Batch, mutable: Any = False) -> Any:
  """A composition's logits on a batch (padded or packed rows, and m_A's
  states when the batch carries them cached)."""
  return model.apply({'params': params}, batch['inputs'],
                     prompt_len=batch.get('prompt_len'),
                     prompt_mask=batch.get('prompt_mask'),
                     positions=batch.get('positions'),
                     segment_ids=batch.get('segment_ids'),
                     aug_states=aug_cache.states_from_batch(batch),
                     aug_inputs=align_lib.model_inputs(batch),
                     mutable=mutable)


def composition_task(frozen: Params, anchor: transformer.DecoderConfig,
                     augmenting: tuple[composition_lib.Augmenting, ...], *,
                     bridge: composition_lib.BridgeConfig,
                     prompt_only: bool = False, write_penalty: float = 0.0,
                     name: str = 'calm', align: str = 'none') -> Task:
  """CALM: anchor and augmenting trees frozen, the bridges trainable.

  `write_penalty` (ours; 0 is the paper) adds that weight times the mean
  over real tokens of the squared norm of all the bridges write there to
  the loss (`xent` stays the cross-entropy; `penalty` is logged beside it).
  """
  model = composition_lib.ComposedLM(anchor, augmenting, bridge=bridge,
                                     prompt_only=prompt_only, align=align)

  def init_trainable(rng):
    # Only the composition subtree leaves this function, so under jit XLA
    # drops the work of initialising the (discarded) frozen models.
    tokens = jnp.zeros((1, 8), jnp.int32)
    aug_inputs = None
    if model.aligned:
      aug_inputs = {a.name: {'tokens': tokens, 'counts': jnp.ones_like(tokens),
                             'prompt_mask': jnp.ones_like(tokens)}
                    for a in augmenting}
    params = model.init(rng, tokens, prompt_len=jnp.ones((1,), jnp.int32),
                        aug_inputs=aug_inputs)
    return {'composition': params['params']['composition']}

  def loss(p, b):
    logits, cols = composed_apply(model, p, b, mutable=['intermediates'])
    xent, aux = weighted_xent(logits, b)
    writes = cols['intermediates']
    sq = sum(v for k, vs in writes.items() if k.startswith('write_sq_')
             for v in vs)
    # Real input positions: BOS, prompt and target, up to the last one
    # weighted (whatever the tokenizer's pad id).
    w = b['weights']
    real = (jnp.cumsum(w[:, ::-1], 1)[:, ::-1] > 0).astype(jnp.float32)
    penalty = write_penalty * (sq * real).sum() / jnp.maximum(real.sum(), 1.0)
    return xent + penalty, {'xent': xent, 'accuracy': aux['accuracy'],
                            'penalty': penalty}

  return Task(name=name, model=model, frozen=frozen,
              init_trainable=init_trainable, composed=True,
              apply=model_apply(model, True),
              loss=loss if write_penalty else None)


def lora_task(anchor_cfg: transformer.DecoderConfig, anchor: Params,
              rank: int, targets: tuple[str, ...]) -> Task:
  """LoRA adapters of `rank` on the frozen anchor's `targets` kernels."""
  model = transformer.Decoder(anchor_cfg)
  return Task(
      name='lora', model=model, frozen={'anchor': anchor},
      init_trainable=lambda r: {'lora': lora_lib.init(r, anchor, rank,
                                                      targets)},
      apply=lambda p, b: decoder_apply(
          model, lora_lib.merge(p['anchor'], p['lora']), b))


def full_ft_task(anchor_cfg: transformer.DecoderConfig, anchor: Params
                 ) -> Task:
  """The anchor's own weights, all trainable, starting from the anchor."""
  model = transformer.Decoder(anchor_cfg)

  def init_trainable(rng):
    # The anchor's own weights, boxed with their logical axes for sharding.
    boxed = model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']
    return jax.tree_util.tree_map(
        lambda box, w: box.replace_boxed(w), boxed, anchor,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))

  return Task(name='full_ft', model=model, frozen={},
              init_trainable=init_trainable, composed=False,
              apply=model_apply(model, False))


def trainable_size(task: Task) -> int:
  """Trainable parameters of a task, from shapes alone."""
  return transformer.count_params(
      jax.eval_shape(task.init_trainable, jax.random.key(0)))
