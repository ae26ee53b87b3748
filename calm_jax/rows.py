"""The rows of a results table: CALM, each model alone, baselines, ablations.

Each row name in `config.rows` maps to a builder that returns what to train
(a `train.Task`, or None for a frozen model scored as it is) and how to turn
the trained parameters into an `evaluation.Row`. The paper's rows:

  m_B, m_A            each frozen model alone
  calm                the composition as configured
  lora                LoRA on m_B, rank matched to CALM's parameter count
  full_ft             m_B fully fine-tuned on the composition set D_C (or on
                      `baselines.full_ft_split`, e.g. m_A's corpus)
  calm_vanilla_aug    CALM over an m_A of the same architecture pretrained
                      on `vanilla_split` (arithmetic text without the keys)
  calm_random_aug     CALM over a randomly initialised m_A
  calm_prompt_only    CALM whose m_A reads the prompt only
  calm_n1, calm_n2    CALM with 1 or 2 layer pairs per augmenting model
  calm_every_layer    CALM pairing every m_A layer (k = 1)

All trained rows use `config.train` on `config.train.split` (D_C), except
`full_ft` when `baselines.full_ft_split` names another split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from calm_jax import compositions
from calm_jax import evaluation
from calm_jax.models import composition as composition_lib
from calm_jax.models import lora as lora_lib
from calm_jax.models import transformer

Params = Any


@dataclasses.dataclass
class Context:
  """What every row builder may read: the config and the frozen models."""
  config: ml_collections.ConfigDict
  anchor: transformer.DecoderConfig
  augmenting: tuple[composition_lib.Augmenting, ...]
  frozen: dict[str, Params]  # 'anchor', 'aug_<name>'.
  seed: int  # Of the frozen models' random stand-ins (calm_random_aug).
  # role -> (arch, params); loads or pretrains extra frozen models on demand.
  extra_model: Callable[[str, str, ml_collections.ConfigDict],
                        tuple[transformer.DecoderConfig, Params]]
  # arch -> shardings of a plain LM's params on the mesh.
  place: Callable[[transformer.DecoderConfig, Params], Params]
  # Where each frozen model of `frozen` comes from ('anchor', 'aug_<name>').
  refs: dict[str, compositions.ModelRef] = dataclasses.field(
      default_factory=dict)
  # (role, model config) -> the directory `extra_model` reads it from.
  model_path: Callable[[str, ml_collections.ConfigDict], str] | None = None


@dataclasses.dataclass
class Built:
  """A row: what trains (None: nothing) and how to score the result."""
  task: Any  # train.Task | None
  to_eval: Callable[[Params | None], list[evaluation.Row]]
  trained: bool = True
  # The split `task` trains on; '' = config.train.split (D_C).
  split: str = ''
  # Its number of steps; 0 = config.train.steps.
  steps: int = 0
  # A composition's frozen models ('anchor', 'aug_<name>'), recorded in its
  # run's composition.json; None for rows that are not compositions.
  refs: dict[str, compositions.ModelRef] | None = None


def _calm(ctx: Context, name: str, *, augmenting=None, frozen=None,
          prompt_only: bool | None = None, refs=None) -> Built:
  from calm_jax import train  # Deferred: train imports this module.
  augmenting = augmenting or ctx.augmenting
  frozen = frozen or ctx.frozen
  task = train.composition_task(ctx.config, frozen, ctx.anchor, augmenting,
                                prompt_only=prompt_only, name=name)
  return Built(task, lambda trained: [evaluation.Row(
      name, task.model, {**frozen, **trained}, composed=True)],
               refs={**ctx.refs, **(refs or {})} if ctx.refs else None)


def _with_pairs(ctx: Context, every_k: Callable[[int], int]
                ) -> tuple[composition_lib.Augmenting, ...]:
  out = []
  for a in ctx.augmenting:
    k = every_k(a.config.num_layers)
    pairs = composition_lib.select_pairs(
        a.config.num_layers, ctx.anchor.num_layers, k,
        f'models.augmenting.{a.name}')
    out.append(dataclasses.replace(a, pairs=pairs))
  return tuple(out)


def m_b(ctx: Context) -> Built:
  return Built(None, lambda _: [evaluation.Row(
      'm_B', transformer.Decoder(ctx.anchor), ctx.frozen['anchor'])],
               trained=False)


def m_a(ctx: Context) -> Built:
  names = len(ctx.augmenting) > 1
  return Built(None, lambda _: [
      evaluation.Row(f'm_A ({a.name})' if names else 'm_A',
                     transformer.Decoder(a.config), ctx.frozen[f'aug_{a.name}'])
      for a in ctx.augmenting], trained=False)


def calm(ctx: Context) -> Built:
  return _calm(ctx, 'calm')


def calm_prompt_only(ctx: Context) -> Built:
  return _calm(ctx, 'calm_prompt_only', prompt_only=True)


def calm_n1(ctx: Context) -> Built:
  return _calm(ctx, 'calm_n1', augmenting=_with_pairs(ctx, lambda n: n))


def calm_n2(ctx: Context) -> Built:
  return _calm(ctx, 'calm_n2', augmenting=_with_pairs(ctx, lambda n: n // 2))


def calm_every_layer(ctx: Context) -> Built:
  return _calm(ctx, 'calm_every_layer',
               augmenting=_with_pairs(ctx, lambda n: 1))


def calm_vanilla_aug(ctx: Context) -> Built:
  frozen, refs = dict(ctx.frozen), {}
  for name, m in ctx.config.models.augmenting.items():
    vanilla = ml_collections.ConfigDict(m.to_dict())
    vanilla.checkpoint = m.vanilla_checkpoint
    vanilla.pretrain.split = m.vanilla_split
    _, frozen[f'aug_{name}'] = ctx.extra_model(
        f'vanilla_{name}', f'models.augmenting.{name}', vanilla)
    if ctx.model_path:
      refs[f'aug_{name}'] = compositions.ModelRef(
          ctx.model_path(f'vanilla_{name}', vanilla))
  return _calm(ctx, 'calm_vanilla_aug', frozen=frozen, refs=refs)


def calm_random_aug(ctx: Context) -> Built:
  from calm_jax import train
  frozen, refs = dict(ctx.frozen), {}
  for i, a in enumerate(ctx.augmenting):
    task = train.decoder_task('random', a.config)
    params = nn.meta.unbox(jax.jit(task.init_trainable)(
        jax.random.key(1000 + ctx.seed + i)))
    frozen[f'aug_{a.name}'] = ctx.place(a.config, params)
    refs[f'aug_{a.name}'] = compositions.ModelRef(
        random_seed=1000 + ctx.seed + i,
        arch=dataclasses.replace(a.config, remat=False).to_dict())
  return _calm(ctx, 'calm_random_aug', frozen=frozen, refs=refs)


def composition_size(ctx: Context) -> int:
  """Trainable parameters of the configured composition."""
  from calm_jax import train
  task = train.composition_task(ctx.config, ctx.frozen, ctx.anchor,
                                ctx.augmenting)
  return transformer.count_params(
      jax.eval_shape(task.init_trainable, jax.random.key(0)))


def lora(ctx: Context) -> Built:
  from calm_jax import train
  cfg = ctx.config.baselines
  anchor = ctx.frozen['anchor']
  targets = tuple(cfg.lora_targets) or lora_lib.DEFAULT_TARGETS
  rank = cfg.lora_rank or lora_lib.rank_for_budget(
      anchor, composition_size(ctx), targets)
  model = transformer.Decoder(ctx.anchor)
  task = train.Task(
      name='lora', model=model, frozen={'anchor': anchor},
      init_trainable=lambda r: {'lora': lora_lib.init(r, anchor, rank,
                                                      targets)},
      apply=lambda p, b: train.decoder_apply(
          model, lora_lib.merge(p['anchor'], p['lora']), b))
  return Built(task, lambda trained: [evaluation.Row(
      'lora', model, jax.jit(lora_lib.merge)(anchor, trained['lora']))])


def full_ft(ctx: Context) -> Built:
  from calm_jax import train
  model = transformer.Decoder(ctx.anchor)
  anchor = ctx.frozen['anchor']

  def init_trainable(rng):
    # The anchor's own weights, boxed with their logical axes for sharding.
    boxed = model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']
    return jax.tree_util.tree_map(
        lambda box, w: box.replace_boxed(w), boxed, anchor,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))

  task = train.Task(
      name='full_ft', model=model, frozen={}, init_trainable=init_trainable,
      apply=lambda p, b: train.decoder_apply(model, p, b))
  return Built(task, lambda trained: [evaluation.Row('full_ft', model,
                                                     trained)],
               split=ctx.config.baselines.get('full_ft_split', ''),
               steps=ctx.config.baselines.get('full_ft_steps', 0))


BUILDERS: dict[str, Callable[[Context], Built]] = {
    'm_B': m_b, 'm_A': m_a, 'calm': calm, 'lora': lora, 'full_ft': full_ft,
    'calm_vanilla_aug': calm_vanilla_aug, 'calm_random_aug': calm_random_aug,
    'calm_prompt_only': calm_prompt_only, 'calm_n1': calm_n1,
    'calm_n2': calm_n2, 'calm_every_layer': calm_every_layer,
}
# What a scheduler must know before building a row (launch/local.py): the
# rows that train nothing (a frozen model scored as it is), and those whose
# builder pretrains a frozen model of its own on first use (`extra_model`),
# which must not run in two processes at once. A new row of either kind
# belongs here too.
FROZEN_ROWS = ('m_A', 'm_B')
ROWS_WITH_OWN_MODELS = ('calm_vanilla_aug',)
