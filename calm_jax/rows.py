"""The rows of a results table: CALM, each model alone, baselines, ablations.

Each row name in `config.rows` is registered with `@row(...)`: a builder
that returns what to train (a `tasks.Task`, or None for a frozen model
scored as it is) and how to turn the trained parameters into
`evaluation.Row`s, and the row's kind (`frozen`, `own_models`), which
schedulers read before building anything. The paper's rows:

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
import ml_collections

from calm_jax import compositions
from calm_jax import evaluation
from calm_jax import tasks
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
  bridge: composition_lib.BridgeConfig
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
  # Aligned streams ({augmenting model: its tokenizer}, composition.align=
  # 'chars'); None: every model reads the anchor's ids.
  aligned: dict[str, Any] | None = None
  # Augmenting model name -> the eval splits in its own tokenizer (for
  # scoring m_A alone when it reads another tokenizer than the anchor).
  own_splits: Callable[[str], dict[str, Any]] | None = None


@dataclasses.dataclass
class Built:
  """A row: what trains (None: nothing) and how to score the result."""
  task: tasks.Task | None
  to_eval: Callable[[Params | None], list[evaluation.Row]]
  # The split `task` trains on; '' = config.train.split (D_C).
  split: str = ''
  # Its number of steps; 0 = config.train.steps.
  steps: int = 0
  # A composition's frozen models ('anchor', 'aug_<name>'), recorded in its
  # run's composition.json; None for rows that are not compositions.
  refs: dict[str, compositions.ModelRef] | None = None


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """A registered row: its builder and its kind."""
  build: Callable[[Context], Built]
  # Trains nothing: a frozen model scored as it is, once (not per seed).
  frozen: bool = False
  # Pretrains a frozen model of its own on first use (`extra_model`), which
  # must not run in two processes at once.
  own_models: bool = False


ROWS: dict[str, RowSpec] = {}


def row(name: str, *, frozen: bool = False, own_models: bool = False):
  """Registers a row builder under `name`."""
  def register(build: Callable[[Context], Built]):
    ROWS[name] = RowSpec(build, frozen=frozen, own_models=own_models)
    return build
  return register


def validate(config: ml_collections.ConfigDict) -> None:
  """`config.rows`: known names, and what each needs that the config has."""
  if not config.rows:
    raise ValueError("rows is empty; list the table's rows, e.g. "
                     "('m_B', 'm_A', 'calm').")
  if isinstance(config.rows, str):
    raise ValueError(f'rows={config.rows!r} must be a tuple of row names, '
                     f"e.g. ('{config.rows}',).")
  for i, name in enumerate(config.rows):
    if name not in ROWS:
      raise ValueError(f'rows[{i}]={name!r} is not a known row; choose from '
                       f'{sorted(ROWS)}.')
  if 'calm_vanilla_aug' in config.rows:
    for name, m in config.models.augmenting.items():
      field = f'models.augmenting.{name}'
      if m.checkpoint and not m.vanilla_checkpoint:
        raise ValueError(
            "rows has 'calm_vanilla_aug', which composes an m_A of "
            f"{field}.checkpoint's architecture trained without its skill; "
            "a checkpoint's m_A is not pretrained here, so set "
            f'{field}.vanilla_checkpoint to such a model, or drop the row.')


def _calm(ctx: Context, name: str, *, augmenting=None, frozen=None,
          prompt_only: bool | None = None, refs=None,
          bridge: composition_lib.BridgeConfig | None = None) -> Built:
  augmenting = augmenting or ctx.augmenting
  frozen = frozen or ctx.frozen
  c = ctx.config.composition
  task = tasks.composition_task(
      frozen, ctx.anchor, augmenting, bridge=bridge or ctx.bridge,
      prompt_only=c.prompt_only if prompt_only is None else prompt_only,
      write_penalty=c.write_penalty, name=name,
      align=c.get('align', 'none'))
  return Built(task, lambda trained: [evaluation.Row(
      name, task.model, {**frozen, **trained}, composed=True,
      aligned=ctx.aligned)],
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


@row('m_B', frozen=True)
def m_b(ctx: Context) -> Built:
  return Built(None, lambda _: [evaluation.Row(
      'm_B', transformer.Decoder(ctx.anchor), ctx.frozen['anchor'])])


@row('m_A', frozen=True)
def m_a(ctx: Context) -> Built:
  names = len(ctx.augmenting) > 1

  def own(a):
    # m_A on its own tokenizer's ids, when that is not the anchor's.
    if not ctx.aligned or ctx.own_splits is None:
      return {}
    return {'tokenizer': ctx.aligned[a.name],
            'splits': ctx.own_splits(a.name)}

  return Built(None, lambda _: [
      evaluation.Row(f'm_A ({a.name})' if names else 'm_A',
                     transformer.Decoder(a.config), ctx.frozen[f'aug_{a.name}'],
                     **own(a))
      for a in ctx.augmenting])


@row('calm')
def calm(ctx: Context) -> Built:
  return _calm(ctx, 'calm')


@row('calm_paper')
def calm_paper(ctx: Context) -> Built:
  """The paper's method exactly, whatever the config's bridge: its bridge
  (anchor queries, linear f_proj, no recency bias) between block outputs
  chosen by its rule, every 4th m_A layer (every layer of a shallower m_A),
  with the config's head count. Beside `calm`, it measures what the
  config's deviations from the paper buy."""
  return _calm(ctx, 'calm_paper',
               augmenting=_with_pairs(ctx, lambda n: min(4, n)),
               bridge=composition_lib.BridgeConfig(
                   'paper', ctx.bridge.cross_heads))


@row('calm_prompt_only')
def calm_prompt_only(ctx: Context) -> Built:
  return _calm(ctx, 'calm_prompt_only', prompt_only=True)


@row('calm_n1')
def calm_n1(ctx: Context) -> Built:
  return _calm(ctx, 'calm_n1', augmenting=_with_pairs(ctx, lambda n: n))


@row('calm_n2')
def calm_n2(ctx: Context) -> Built:
  return _calm(ctx, 'calm_n2', augmenting=_with_pairs(ctx, lambda n: n // 2))


@row('calm_every_layer')
def calm_every_layer(ctx: Context) -> Built:
  return _calm(ctx, 'calm_every_layer',
               augmenting=_with_pairs(ctx, lambda n: 1))


@row('calm_vanilla_aug', own_models=True)
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


@row('calm_random_aug')
def calm_random_aug(ctx: Context) -> Built:
  frozen, refs = dict(ctx.frozen), {}
  for i, a in enumerate(ctx.augmenting):
    task = tasks.decoder_task('random', a.config)
    params = nn.meta.unbox(jax.jit(task.init_trainable)(
        jax.random.key(1000 + ctx.seed + i)))
    frozen[f'aug_{a.name}'] = ctx.place(a.config, params)
    refs[f'aug_{a.name}'] = compositions.ModelRef(
        random_seed=1000 + ctx.seed + i,
        arch=dataclasses.replace(a.config, remat=False,
                                 attention='auto').to_dict())
  return _calm(ctx, 'calm_random_aug', frozen=frozen, refs=refs)


def composition_size(ctx: Context) -> int:
  """Trainable parameters of the configured composition."""
  return tasks.trainable_size(tasks.composition_task(
      ctx.frozen, ctx.anchor, ctx.augmenting, bridge=ctx.bridge))


@row('lora')
def lora(ctx: Context) -> Built:
  cfg = ctx.config.baselines
  anchor = ctx.frozen['anchor']
  targets = tuple(cfg.lora_targets) or lora_lib.DEFAULT_TARGETS
  rank = cfg.lora_rank or lora_lib.rank_for_budget(
      anchor, composition_size(ctx), targets)
  task = tasks.lora_task(ctx.anchor, anchor, rank, targets)
  return Built(task, lambda trained: [evaluation.Row(
      'lora', task.model, jax.jit(lora_lib.merge)(anchor, trained['lora']))])


@row('full_ft')
def full_ft(ctx: Context) -> Built:
  task = tasks.full_ft_task(ctx.anchor, ctx.frozen['anchor'])
  return Built(task, lambda trained: [evaluation.Row('full_ft', task.model,
                                                     trained)],
               split=ctx.config.baselines.full_ft_split,
               steps=ctx.config.baselines.full_ft_steps)
