"""Pure step functions: (state, batch, rng, ...) -> (state, measurements).

Dependencies (modules, loss weights, preprocessing constants) are keyword-only
and bound with functools.partial before jit, so the jitted functions see only
arrays. The batch is a dict {'image': uint8 [B, H, W, C], 'label': int32 [B]}
of GLOBAL arrays; under jit over a 'data' mesh the losses below span the whole
global batch (the compiler inserts the all-gathers and reductions).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from imbal_jax import losses
from imbal_jax.data import augment as augment_lib


class TrainState(train_state.TrainState):
  """Optimizer state over `params`, plus batch-norm statistics (not trained)."""

  batch_stats: Any = None


def preprocess(images, rng, *, pixel_mean, pixel_std, augment: str, crop_padding: int):
  """uint8 images -> augmented (when `rng` is given), normalised floats."""
  x = images.astype(jnp.float32) / 255.0
  if rng is not None:
    x = augment_lib.augment(x, rng, augment, crop_padding)
  return augment_lib.normalize(x, pixel_mean, pixel_std)


def stage1_loss(params, batch_stats, images, labels, *, model: nn.Module,
                contrastive_weight: float, temperature: float):
  """CE + contrastive_weight * SupCon over the (global) batch."""
  (logits, embeddings), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'])
  ce = losses.softmax_cross_entropy(logits, labels)
  contrastive = losses.supervised_contrastive(embeddings, labels, temperature)
  loss = ce + contrastive_weight * contrastive
  aux = {'ce': ce, 'contrastive': contrastive, 'logits': logits,
         'batch_stats': updates['batch_stats']}
  return loss, aux


def stage1_step(state: TrainState, batch, rng, *, model: nn.Module, contrastive_weight: float,
                temperature: float, learning_rate_fn: Callable, pixel_mean: Sequence[float],
                pixel_std: Sequence[float], augment: str, crop_padding: int):
  """One SGD step of the encoder and both heads."""
  step_rng = jax.random.fold_in(rng, state.step)
  images = preprocess(batch['image'], step_rng, pixel_mean=pixel_mean, pixel_std=pixel_std,
                      augment=augment, crop_padding=crop_padding)
  labels = batch['label']
  grad_fn = jax.value_and_grad(stage1_loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, images, labels, model=model,
                               contrastive_weight=contrastive_weight, temperature=temperature)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux['batch_stats'])
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
  labels = batch['label']
  (loss, logits), grads = jax.value_and_grad(stage2_loss, has_aux=True)(
      state.params, features, labels, head=head)
  new_state = state.apply_gradients(grads=grads)
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


def stage1_logits(variables, images, *, model: nn.Module):
  return model.apply(variables, images, train=False)[0]


def stage2_logits(variables, images, *, encoder: nn.Module, head: nn.Module):
  features = encoder.apply(variables['encoder'], images, train=False)
  return head.apply(variables['head'], features)
