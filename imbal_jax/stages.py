"""The two stages as the training loop sees them: initial state, jitted step,
evaluation variables and logits function.

Stage 1: encoder + classifier + projection head, trained with the objective of
objectives.py. Stage 2: the stage-1 encoder selected on validation, frozen,
under a freshly initialised linear head (classifier re-training, Kang et al.
2020).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from imbal_jax import checkpoint, configuration, objectives, sharding, steps
from imbal_jax.data import sources
from imbal_jax.models import LinearHead, Stage1Net, encoder_variables, make_encoder


@dataclasses.dataclass
class Stage:
  """What differs between the stages; the loop is shared."""

  state: steps.TrainState
  train_step: Callable  # (state, global batch, rng) -> (state, measurements)
  eval_variables: Callable  # state -> the variables `logits_fn` reads
  logits_fn: Callable
  extra_report: dict[str, Any]


def _weight_decay_mask(params):
  # Decay conv and dense kernels only, not biases or batch-norm scales.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
  total_steps = config.num_epochs * steps_per_epoch
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if warmup_steps:
    learning_rate_fn = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps, total_steps, end_value=0.0)
  else:
    learning_rate_fn = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=_weight_decay_mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None))
  return tx, learning_rate_fn


def jit_train_step(step_fn, mesh, num_extra_args: int = 0):
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(step_fn, donate_argnums=0,
                 in_shardings=(repl, data, repl) + (repl,) * num_extra_args,
                 out_shardings=(repl, repl))


def preprocess_kwargs(config, data_info):
  return dict(pixel_mean=tuple(data_info['pixel_mean']), pixel_std=tuple(data_info['pixel_std']),
              augment=config.augment, crop_padding=config.crop_padding)


def stage1_state(variables, tx, rng, num_classes: int, projection_dim: int) -> steps.TrainState:
  """The stage-1 train state; class centres start as random unit vectors."""
  centers = jax.random.normal(rng, (num_classes, projection_dim))
  centers = centers / jnp.linalg.norm(centers, axis=-1, keepdims=True)
  return steps.TrainState.create(apply_fn=None, params=variables['params'],
                                 batch_stats=variables['batch_stats'], centers=centers, tx=tx)


def stage1_step_fn(config, model, data_info, steps_per_epoch: int, learning_rate_fn):
  """steps.stage1_step with everything the config chooses bound (before jit)."""
  return functools.partial(
      steps.stage1_step, model=model, contrastive_weight=config.contrastive_weight,
      learning_rate_fn=learning_rate_fn, num_views=config.num_views,
      classification_loss=objectives.classification_loss(
          config, data_info['counts']['train'], steps_per_epoch),
      metric_loss=objectives.metric_loss(config),
      **preprocess_kwargs(config, data_info))


def build_stage1(config, dataset: sources.Dataset, data_info, mesh, steps_per_epoch) -> Stage:
  encoder = make_encoder(config.model, config.width, dataset.image_shape[0])
  model = Stage1Net(encoder=encoder, num_classes=dataset.num_classes,
                    projection_dim=config.projection_dim)
  tx, learning_rate_fn = make_optimizer(config, steps_per_epoch)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1,) + dataset.image_shape, jnp.float32), train=False)
    return stage1_state(variables, tx, jax.random.fold_in(rng, 1), dataset.num_classes,
                        config.projection_dim)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(config.seed))
  step_fn = stage1_step_fn(config, model, data_info, steps_per_epoch, learning_rate_fn)
  return Stage(
      state=state, train_step=jit_train_step(step_fn, mesh),
      eval_variables=lambda s: {'params': s.params, 'batch_stats': s.batch_stats},
      logits_fn=functools.partial(steps.stage1_logits, model=model),
      extra_report={})


def build_stage2(config, dataset: sources.Dataset, data_info, mesh, steps_per_epoch) -> Stage:
  stage1_dir, stage1_config = configuration.stage1_run(config.init_from)
  encoder = make_encoder(config.model, config.width, dataset.image_shape[0])
  stage1_model = Stage1Net(encoder=encoder, num_classes=dataset.num_classes,
                           projection_dim=config.projection_dim)
  dummy = jnp.zeros((1,) + dataset.image_shape, jnp.float32)
  stage1_like = jax.jit(lambda: stage1_model.init(jax.random.key(0), dummy, train=False),
                        out_shardings=sharding.replicated(mesh))()
  stage1_variables, stage1_info = checkpoint.restore_best(stage1_dir, stage1_like)
  frozen = encoder_variables(stage1_variables['params'], stage1_variables['batch_stats'])

  head = LinearHead(dataset.num_classes)
  tx, learning_rate_fn = make_optimizer(config, steps_per_epoch)

  def init(rng):
    features = encoder.apply(frozen, dummy, train=False)
    params = head.init(rng, features)['params']
    return steps.TrainState.create(apply_fn=head.apply, params=params, batch_stats={}, tx=tx)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(config.seed))
  step_fn = functools.partial(steps.stage2_step, encoder=encoder, head=head,
                              learning_rate_fn=learning_rate_fn,
                              **preprocess_kwargs(config, data_info))
  jitted = jit_train_step(step_fn, mesh, num_extra_args=1)
  return Stage(
      state=state,
      train_step=lambda s, batch, rng: jitted(s, batch, rng, frozen),
      eval_variables=lambda s: {'encoder': frozen, 'head': {'params': s.params}},
      logits_fn=functools.partial(steps.stage2_logits, encoder=encoder, head=head),
      extra_report={'init_from': str(stage1_dir),
                    'stage1_selected_step': stage1_info['step'],
                    'stage1_config': stage1_config})
