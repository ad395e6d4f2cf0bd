"""The two stages as the training loop sees them: initial state, jitted step,
evaluation variables and logits function.

Stage 1: encoder + classifier + projection head, trained with the objective of
objectives.py. Stage 2: the stage-1 encoder selected on validation, frozen,
under the classifier `config.stage2_method` names (classifiers.py): trained
by the loop (cRT, LWS; on images or on cached features, feature_cache.py) or
computed in closed form with no training steps (tau-norm, NCM, post-hoc logit
adjustment).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imbal_jax import (checkpoint, classifiers, configuration, feature_cache, objectives,
                       sharding, steps)
from imbal_jax.data import sources
from imbal_jax.models import Stage1Net, make_encoder


@dataclasses.dataclass
class Stage:
  """What differs between the stages; the loop is shared."""

  state: steps.TrainState | None  # None until `fit` for a closed-form classifier
  train_step: Callable | None  # (state, global batch, rng) -> (state, measurements)
  eval_variables: Callable  # state -> the variables `logits_fn` reads
  logits_fn: Callable
  extra_report: dict[str, Any]
  # A closed-form classifier: fit(score_fn) -> (state at step 0, its validation score),
  # where score_fn maps validation probabilities to the selection metric. The loop
  # then runs no training steps; what fit chose is recorded in extra_report.
  fit: Callable | None = None
  # Maps the loop's pipeline.TrainBatches to what its data iterator reads instead
  # (cached features); None: the images.
  batch_source: Callable | None = None


def _weight_decay_mask(params):
  # Decay conv and dense kernels only, not biases or batch-norm scales.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable:
  """Step -> learning rate: a linear warm-up from 0 over warmup_epochs, then
  config.lr_schedule: 'cosine' decay to 0 at the last step, or 'step', the rate
  times lr_decay_factor from each of the epochs lr_decay_epochs on."""
  total_steps = config.num_epochs * steps_per_epoch
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.get('lr_schedule', 'cosine') == 'step':
    # join_schedules runs the second schedule from 0 at the end of the warm-up.
    boundaries = {epoch * steps_per_epoch - warmup_steps: config.lr_decay_factor
                  for epoch in configuration.decay_epochs(config.lr_decay_epochs)}
    constant = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
    if not warmup_steps:
      return constant
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup_steps), constant],
        [warmup_steps])
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps, total_steps, end_value=0.0)
  return optax.cosine_decay_schedule(config.learning_rate, total_steps)


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
  learning_rate_fn = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=_weight_decay_mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None))
  return tx, learning_rate_fn


@dataclasses.dataclass(frozen=True)
class WithTrailingArgs:
  """`fn(*args, *trailing)`: a jitted function with its last arguments supplied."""
  fn: Callable
  trailing: tuple

  def __call__(self, *args):
    return self.fn(*args, *self.trailing)


def jit_train_step(step_fn, mesh, num_extra_args: int = 0, pixel_stats=None):
  """`step_fn(state, batch, rng, *extra)` jitted for the mesh, the state donated.

  With `pixel_stats` (from `pixel_stats(data_info)`), `step_fn` also takes
  `pixel_mean=` and `pixel_std=`; they reach the compiled step as arguments, not
  as constants baked into it, so one compiled program serves every seed and
  data subset of the same shapes (and hits the persistent compilation cache
  across them). The result is then a WithTrailingArgs that still takes
  (state, batch, rng, *extra).
  """
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  num_stats = 0 if pixel_stats is None else 2
  in_shardings = (repl, data, repl) + (repl,) * (num_extra_args + num_stats)
  if pixel_stats is None:
    return jax.jit(step_fn, donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(repl, repl), compiler_options=sharding.compiler_options(mesh))

  def with_stats(state, batch, rng, *extra_then_stats):
    *extra, pixel_mean, pixel_std = extra_then_stats
    return step_fn(state, batch, rng, *extra, pixel_mean=pixel_mean, pixel_std=pixel_std)

  jitted = jax.jit(with_stats, donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(repl, repl), compiler_options=sharding.compiler_options(mesh))
  return WithTrailingArgs(jitted, steps.put_pixel_stats(pixel_stats, mesh))


def pixel_stats(data_info) -> tuple[np.ndarray, np.ndarray]:
  """The training split's per-channel pixel mean and std (run_data.describe_data), float32."""
  return (np.asarray(data_info['pixel_mean'], np.float32),
          np.asarray(data_info['pixel_std'], np.float32))


def preprocess_kwargs(config):
  """The compile-time preprocessing choices (the pixel statistics are arguments)."""
  return dict(augment=config.augment, crop_padding=config.crop_padding)


def stage1_state(variables, tx, rng, num_classes: int, projection_dim: int) -> steps.TrainState:
  """The stage-1 train state; class centres start as random unit vectors."""
  centers = jax.random.normal(rng, (num_classes, projection_dim))
  centers = centers / jnp.linalg.norm(centers, axis=-1, keepdims=True)
  return steps.TrainState.create(apply_fn=None, params=variables['params'],
                                 batch_stats=variables['batch_stats'], centers=centers, tx=tx)


def stage1_step_fn(config, model, data_info, steps_per_epoch: int, learning_rate_fn):
  """steps.stage1_step with everything the config chooses bound (before jit), except
  the pixel statistics: jit it with `jit_train_step(..., pixel_stats=pixel_stats(data_info))`."""
  return functools.partial(
      steps.stage1_step, model=model, contrastive_weight=config.contrastive_weight,
      learning_rate_fn=learning_rate_fn, num_views=config.num_views,
      grad_accum_steps=config.grad_accum_steps,
      classification_loss=objectives.classification_loss(
          config, data_info['counts']['train'], steps_per_epoch),
      metric_loss=objectives.metric_loss(config),
      **preprocess_kwargs(config))


def build_stage1(config, dataset: sources.Dataset, data_info, mesh, steps_per_epoch) -> Stage:
  encoder = make_encoder(config.model, config.width, dataset.image_shape[0], config.dtype)
  model = Stage1Net(encoder=encoder, num_classes=dataset.num_classes,
                    probe_classifier=not config.classification_trains_encoder,
                    projection_dim=config.projection_dim, dtype=jnp.dtype(config.dtype))
  tx, learning_rate_fn = make_optimizer(config, steps_per_epoch)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1,) + dataset.image_shape, jnp.float32), train=False)
    return stage1_state(variables, tx, jax.random.fold_in(rng, 1), dataset.num_classes,
                        config.projection_dim)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(config.seed))
  step_fn = stage1_step_fn(config, model, data_info, steps_per_epoch, learning_rate_fn)
  return Stage(
      state=state, train_step=jit_train_step(step_fn, mesh, pixel_stats=pixel_stats(data_info)),
      eval_variables=lambda s: {'params': s.params, 'batch_stats': s.batch_stats},
      logits_fn=functools.partial(steps.stage1_logits, model=model),
      extra_report={})


def build_stage2(config, dataset: sources.Dataset, data_info, mesh, steps_per_epoch) -> Stage:
  stage1_dir, stage1_config = configuration.stage1_run(config.init_from)
  encoder = make_encoder(config.model, config.width, dataset.image_shape[0], config.dtype)
  stage1_model = Stage1Net(encoder=encoder, num_classes=dataset.num_classes,
                           projection_dim=config.projection_dim)
  dummy = jnp.zeros((1,) + dataset.image_shape, jnp.float32)
  stage1_like = jax.jit(lambda: stage1_model.init(jax.random.key(0), dummy, train=False),
                        out_shardings=sharding.replicated(mesh))()
  stage1_variables, stage1_info = checkpoint.restore_best(stage1_dir, stage1_like)

  method = config.stage2_method
  trunk, head = classifiers.modules(method, encoder, dataset.num_classes)
  frozen = classifiers.trunk_variables(method, stage1_variables)
  features = functools.partial(
      feature_cache.compute_features,
      feature_cache.trunk_fn(trunk, mesh, pixel_stats(data_info), **preprocess_kwargs(config)),
      frozen,
      batch_size=config.eval_batch_size, mesh=mesh, seed=config.seed)
  common = dict(
      eval_variables=lambda s: {'encoder': frozen, 'head': {'params': s.params}},
      logits_fn=functools.partial(steps.stage2_logits, encoder=trunk, head=head),
      extra_report={'init_from': str(stage1_dir),
                    'stage1_selected_step': stage1_info['step'],
                    'stage1_selected_score': stage1_info.get('score'),
                    # Which stage-1 model this head was trained on (and a resumed stage 2
                    # refuses another one: workdir.check_stage1_unchanged).
                    'stage1_variables_sha256': checkpoint.variables_sha256(stage1_variables),
                    'stage1_config': stage1_config,
                    'stage2': {'method': method}})
  if method not in classifiers.TRAINED_METHODS:
    fit = closed_form_fit(config, method, stage1_variables['params']['classifier']['dense'],
                          features, dataset, data_info, mesh, common['extra_report']['stage2'])
    return Stage(state=None, train_step=None, fit=fit, **common)

  tx, learning_rate_fn = make_optimizer(config, steps_per_epoch)

  def init(rng):
    params = head.init(rng, trunk.apply(frozen, dummy, train=False))['params']
    return steps.TrainState.create(apply_fn=head.apply, params=params, batch_stats={}, tx=tx)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(config.seed))
  if config.cache_features:
    table = features(dataset.splits['train'], views=config.feature_views)
    step_fn = functools.partial(feature_cache.head_step, head=head,
                                learning_rate_fn=learning_rate_fn)
    return Stage(state=state, train_step=jit_train_step(step_fn, mesh),
                 batch_source=lambda batches: feature_cache.FeatureBatches(
                     batches, table, config.seed), **common)
  step_fn = functools.partial(steps.stage2_step, encoder=trunk, head=head,
                              learning_rate_fn=learning_rate_fn,
                              **preprocess_kwargs(config))
  jitted = jit_train_step(step_fn, mesh, num_extra_args=1, pixel_stats=pixel_stats(data_info))
  return Stage(state=state, train_step=lambda s, batch, rng: jitted(s, batch, rng, frozen),
               **common)


def closed_form_fit(config, method: str, stage1_classifier, features: Callable,
                    dataset: sources.Dataset, data_info, mesh, record: dict) -> Callable:
  """Stage.fit for tau_norm, posthoc_la and ncm (classifiers.py).

  `stage1_classifier` is the stage-1 {'kernel', 'bias'}; `features(split)` the
  trunk's [1, examples, dim] outputs for a split; the chosen tau (or NCM's
  scale) and the validation scores go into `record`.
  """
  def fit(score_fn):
    val_features = features(dataset.splits['val'])[0]
    if method == 'ncm':
      train = dataset.splits['train']
      means = classifiers.class_means(features(train)[0], train.labels, dataset.num_classes)
      params = {'class_means': means.astype(np.float32)}
      score = float(score_fn(classifiers.ncm_probabilities(val_features, means)))
      record['scale'] = classifiers.NCM_SCALE
    else:
      kernel, bias = np.asarray(stage1_classifier['kernel']), np.asarray(stage1_classifier['bias'])
      if method == 'tau_norm':
        linear = lambda tau: classifiers.tau_normalized(kernel, bias, tau)
      else:
        linear = lambda tau: classifiers.logit_adjusted(kernel, bias,
                                                        data_info['counts']['train'], tau)
      grid = classifiers.tau_grid(config.tau_grid_max, config.tau_grid_step)
      tau, scores = classifiers.choose_tau(linear, val_features, score_fn, grid)
      params, score = classifiers.linear_params(*linear(tau)), scores[tau]
      record.update(tau=tau, val_scores={f'{t:g}': s for t, s in scores.items()})
    state = steps.TrainState.create(apply_fn=None, params=sharding.put_replicated(params, mesh),
                                    batch_stats={}, tx=optax.set_to_zero())
    return state, score

  return fit
