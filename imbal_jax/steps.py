"""Pure step functions: (state, batch, rng, ...) -> (state, measurements).

Dependencies (modules, loss weights, preprocessing constants) are keyword-only
and bound with functools.partial before jit, so the jitted functions see only
arrays. The batch is a dict {'image': uint8 [B, H, W, C], 'label': int32 [B]}
of GLOBAL arrays; under jit over a 'data' mesh the losses below span the whole
global batch (the compiler inserts the all-gathers and reductions).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from imbal_jax import losses, sharding
from imbal_jax.data import augment as augment_lib


class TrainState(train_state.TrainState):
  """Optimizer state over `params`, plus batch-norm statistics (not trained).

  `centers` holds running class centres for the class-centre metric loss
  (stage 1; None otherwise). `nonfinite_steps` counts updates that were refused because the loss or a
  gradient was not finite; `first_nonfinite_step` is the first such step
  (-1: none). The host reads them at log steps only.
  """

  batch_stats: Any = None
  centers: Any = None  # class centres of the class-centre metric loss (stage 1)
  nonfinite_steps: Any = None
  first_nonfinite_step: Any = None

  @classmethod
  def create(cls, **kwargs):
    # Arrays, not Python ints, so the step's outputs have its inputs' types (no retrace).
    return super().create(nonfinite_steps=jnp.zeros((), jnp.int32),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32), **kwargs)


def guarded_update(state: TrainState, new_state: TrainState, loss, grads) -> TrainState:
  """`new_state`, or `state` unchanged (counted) if the loss or a gradient is not finite.

  The check runs on the device every step, so training never continues from a
  NaN update, while the host still synchronises only at log steps.
  """
  finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

  def optimizer_leaf(path, new, old):
    # The optimizer's step counts advance even on a skipped step, so its schedule stays
    # at state.step (the learning rate logged is the one applied); its moments do not.
    return new if path and getattr(path[-1], 'name', None) == 'count' else (
        jnp.where(finite, new, old))

  opt_state = jax.tree_util.tree_map_with_path(optimizer_leaf, new_state.opt_state,
                                               state.opt_state)
  return kept.replace(
      opt_state=opt_state,
      step=state.step + 1,
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(
          (~finite) & (state.first_nonfinite_step < 0), state.step + 1,
          state.first_nonfinite_step))


def preprocess(images, rng, *, pixel_mean, pixel_std, augment: str, crop_padding: int):
  """uint8 images -> augmented (when `rng` is given), normalised floats."""
  x = images.astype(jnp.float32) / 255.0
  if rng is not None:
    x = augment_lib.augment(x, rng, augment, crop_padding)
  return augment_lib.normalize(x, pixel_mean, pixel_std)


def stage1_objective(logits, embeddings, labels, step=0, centers=None, *,
                     contrastive_weight: float, temperature: float = 0.1,
                     classification_loss: Callable | None = None,
                     metric_loss: Callable | None = None):
  """classification loss + contrastive_weight * metric loss of the whole (global) batch.

  Defaults: cross-entropy and supervised contrastive with `temperature`. Always
  float32, whatever the model computed in. Returns (loss, aux) with the two
  terms and the metric loss's new class centres.
  """
  logits, embeddings = logits.astype(jnp.float32), embeddings.astype(jnp.float32)
  if classification_loss is None:
    ce = losses.softmax_cross_entropy(logits, labels)
  else:
    ce = classification_loss(logits, labels, step)
  if metric_loss is None:
    contrastive, new_centers = losses.supervised_contrastive(embeddings, labels, temperature), centers
  else:
    contrastive, new_centers = metric_loss(embeddings, labels, centers)
  loss = ce + contrastive_weight * contrastive
  return loss, {'ce': ce, 'contrastive': contrastive, 'centers': new_centers}


def stage1_loss(params, batch_stats, images, labels, step=0, centers=None, *, model: nn.Module,
                **objective_kwargs):
  """`stage1_objective` of the model's outputs on `images` (batch norm in training mode)."""
  (logits, embeddings), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'])
  loss, aux = stage1_objective(logits, embeddings, labels, step, centers, **objective_kwargs)
  return loss, {**aux, 'logits': logits, 'batch_stats': updates['batch_stats']}


def _split(x, parts: int):
  """[n, ...] -> [parts, n // parts, ...]; micro-batch j holds rows j, j + parts, j + 2 parts...

  Strided rather than contiguous: each device's contiguous shard of the global
  batch then holds an equal slice of every micro-batch, so every micro-batch
  still spans all devices.
  """
  return x.reshape((x.shape[0] // parts, parts) + x.shape[1:]).swapaxes(0, 1)


def _merge(x):
  """The inverse of `_split`: rows back in their original order."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _tied(values):
  """`values` unchanged, each now depending on all of them (an optimization barrier).

  Used inside the first micro-batch loop to make the labels an output of the
  loop. Otherwise the step's label-only cross-device reductions (the labels'
  all-gather for the metric loss, the loss's normaliser) depend on no loop,
  and XLA's CPU runtime may run one of them before a loop whose body also
  reduces across devices (batch norm) on some devices and after it on others;
  each then waits for the rest. On jax 0.10.2 with 8 CPU devices on 2 cores
  this deadlocked ("Termination timeout for `all reduce ...`", then an abort)
  in a run of the test suite and in two of at most five runs of
  tests/test_accumulation.py alone; tied, its ResNet test passed 12 runs of 12.
  Passing the labels through the loop untouched is not enough: XLA forwards
  them around it. A barrier outside the loop is not enough either: XLA removes
  barriers before it schedules, and with them the order.
  tests/test_accumulation.py checks the compiled step for such pairs.
  """
  return jax.lax.optimization_barrier(values)


def cached_stage1_gradients(params, batch_stats, images, labels, step, centers, *,
                            model: nn.Module, grad_accum_steps: int, **objective_kwargs):
  """`stage1_loss` and its parameter gradients, `grad_accum_steps` micro-batches at a time.

  The gradient cache of Gao et al. (2021), "Scaling Deep Contrastive Learning
  Batch Size under Limited Memory": the metric loss couples every pair of the
  batch, so averaging per-micro-batch losses would change the objective.
  Instead: (1) run each micro-batch forward, keeping only its logits and
  embeddings; (2) take the full-batch objective and its gradient with respect
  to those outputs; (3) run each micro-batch forward again and pull that
  gradient back to the parameters (a VJP), summing over micro-batches. Peak
  activation memory is one micro-batch's; the price is a second forward pass.

  The result equals the full-batch one except for batch norm, which normalises
  each micro-batch with its own statistics ("ghost" batch norm). The running
  statistics take one momentum update per step, with the micro-batches' means
  and variances averaged: for the same layer inputs that mean is the full
  batch's, and the variance lacks the spread between micro-batch means (law of
  total variance). Deeper layers' inputs already differ through the ghost
  normalisation above them. The class centres are updated
  from the full batch's embeddings, exactly as without accumulation.
  Returns ((loss, aux), grads) like `jax.value_and_grad(stage1_loss, has_aux=True)`.
  """
  micro_images = _split(images, grad_accum_steps)

  def forward(params, micro):
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, micro,
                                   train=True, mutable=['batch_stats'])
    return outputs, updates['batch_stats']

  # Pass 1: nothing is differentiated here, so no activation outlives its micro-batch.
  # The labels leave the loop tied to its outputs (`_tied`).
  def first_pass(carry, inputs):
    micro, micro_labels = inputs
    return carry, _tied((*forward(params, micro), micro_labels))

  _, (outputs, micro_stats, micro_labels) = jax.lax.scan(
      first_pass, None, (micro_images, _split(labels, grad_accum_steps)))
  logits, embeddings, labels = _merge(outputs[0]), _merge(outputs[1]), _merge(micro_labels)
  (loss, aux), output_grads = jax.value_and_grad(
      stage1_objective, argnums=(0, 1), has_aux=True)(
          logits, embeddings, labels, step, centers, **objective_kwargs)

  # Pass 2: recompute each micro-batch and pull its slice of the output gradient back.
  def accumulate(grads, inputs):
    micro, micro_output_grads = inputs
    _, pullback, _ = jax.vjp(lambda p: forward(p, micro), params, has_aux=True)
    (micro_grads,) = pullback(micro_output_grads)
    return jax.tree.map(jnp.add, grads, micro_grads), None

  grads, _ = jax.lax.scan(
      accumulate, jax.tree.map(jnp.zeros_like, params),
      (micro_images, tuple(_split(g, grad_accum_steps) for g in output_grads)))
  # Each micro-batch's update is momentum * old + (1 - momentum) * its statistics;
  # their mean is one update with the mean of the micro-batch statistics.
  new_stats = jax.tree.map(lambda stats: jnp.mean(stats, axis=0), micro_stats)
  return (loss, {**aux, 'logits': logits, 'batch_stats': new_stats}), grads


def stage1_step(state: TrainState, batch, rng, *, model: nn.Module, contrastive_weight: float,
                learning_rate_fn: Callable, pixel_mean: Sequence[float],
                pixel_std: Sequence[float], augment: str, crop_padding: int,
                temperature: float = 0.1, classification_loss: Callable | None = None,
                metric_loss: Callable | None = None, num_views: int = 1,
                grad_accum_steps: int = 1):
  """One SGD step of the encoder and both heads.

  With `num_views=2` every image is augmented twice (independently); both
  views enter the classification loss and the metric loss, so each image has
  at least one positive (its other view), as in Khosla et al. (2020).
  With `grad_accum_steps > 1` the batch goes through the model in that many
  micro-batches (`cached_stage1_gradients`), still one compiled step and one
  optimizer update on the whole batch's loss.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  view_rngs = jax.random.split(step_rng, num_views)
  images = jnp.concatenate([
      preprocess(batch['image'], view_rng, pixel_mean=pixel_mean, pixel_std=pixel_std,
                 augment=augment, crop_padding=crop_padding) for view_rng in view_rngs])
  labels = jnp.concatenate([batch['label']] * num_views)
  objective_kwargs = dict(contrastive_weight=contrastive_weight, temperature=temperature,
                          classification_loss=classification_loss, metric_loss=metric_loss)
  if grad_accum_steps == 1:
    grad_fn = functools.partial(jax.value_and_grad(stage1_loss, has_aux=True), model=model)
  else:
    grad_fn = functools.partial(cached_stage1_gradients, model=model,
                                grad_accum_steps=grad_accum_steps)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, images, labels, state.step,
                               state.centers, **objective_kwargs)
  new_state = guarded_update(
      state, state.apply_gradients(grads=grads, batch_stats=aux['batch_stats'],
                                   centers=aux['centers']), loss, grads)
  measurements = {
      'loss': loss,
      'ce': aux['ce'],
      'contrastive': aux['contrastive'],
      'train_accuracy': jnp.mean(jnp.argmax(aux['logits'], -1) == labels),
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, measurements


def stage2_loss(head_params, features, labels, *, head: nn.Module):
  logits = head.apply({'params': head_params}, features)
  return losses.softmax_cross_entropy(logits, labels), logits


def stage2_step(state: TrainState, batch, rng, encoder_variables, *, encoder: nn.Module,
                head: nn.Module, learning_rate_fn: Callable, pixel_mean: Sequence[float],
                pixel_std: Sequence[float], augment: str, crop_padding: int):
  """One SGD step of the classifier head on frozen encoder features.

  `encoder_variables` is an argument, not a closure constant, so it is not
  baked into the compiled program; the encoder runs in inference mode (batch
  norm uses its stored statistics and nothing is updated).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  images = preprocess(batch['image'], step_rng, pixel_mean=pixel_mean, pixel_std=pixel_std,
                      augment=augment, crop_padding=crop_padding)
  features = jax.lax.stop_gradient(encoder.apply(encoder_variables, images, train=False))
  return head_update(state, features, batch['label'], head=head,
                     learning_rate_fn=learning_rate_fn)


def head_update(state: TrainState, features, labels, *, head: nn.Module,
                learning_rate_fn: Callable):
  """One SGD step of the head on given features: stage 2's update, shared with the
  cached-features step (feature_cache.head_step)."""
  (loss, logits), grads = jax.value_and_grad(stage2_loss, has_aux=True)(
      state.params, features, labels, head=head)
  new_state = guarded_update(state, state.apply_gradients(grads=grads), loss, grads)
  measurements = {
      'loss': loss,
      'ce': loss,
      'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, measurements


def eval_step(variables, batch, *, logits_fn: Callable, pixel_mean: Sequence[float],
              pixel_std: Sequence[float]):
  """Class probabilities of a padded batch; the host keeps the rows 'mask' marks real."""
  images = augment_lib.normalize(batch['image'], pixel_mean, pixel_std)
  return jax.nn.softmax(logits_fn(variables, images).astype(jnp.float32), axis=-1)


def jit_eval_step(logits_fn: Callable, mesh, pixel_stats) -> Callable:
  """`eval_step` jitted for the mesh: (variables, global batch) -> replicated probabilities.

  The pixel statistics (mean, std) are arguments of the compiled program, not
  constants, so runs on other seeds or subsets of the same shapes share it.
  """
  def probabilities(variables, batch, pixel_mean, pixel_std):
    return eval_step(variables, batch, logits_fn=logits_fn, pixel_mean=pixel_mean,
                     pixel_std=pixel_std)

  replicated = sharding.replicated(mesh)
  jitted = jax.jit(probabilities, out_shardings=replicated,
                   in_shardings=(replicated, sharding.data_sharding(mesh), replicated, replicated),
                   compiler_options=sharding.compiler_options(mesh))
  mean, std = put_pixel_stats(pixel_stats, mesh)
  return lambda variables, batch: jitted(variables, batch, mean, std)


def put_pixel_stats(pixel_stats, mesh) -> tuple[jax.Array, jax.Array]:
  """(mean, std), per channel, as float32 arrays replicated on the mesh: the pixel
  statistics as arguments of a compiled step."""
  return tuple(sharding.put_replicated(np.asarray(x, np.float32), mesh) for x in pixel_stats)


def stage1_logits(variables, images, *, model: nn.Module):
  return model.apply(variables, images, train=False)[0]


def stage2_logits(variables, images, *, encoder: nn.Module, head: nn.Module):
  features = encoder.apply(variables['encoder'], images, train=False)
  return head.apply(variables['head'], features)
