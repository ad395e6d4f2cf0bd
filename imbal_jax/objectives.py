"""The stage-1 objective chosen by the config: a classification loss on the
logits (`config.loss`) plus `contrastive_weight` times a metric-learning loss on
the projected embeddings (`config.metric_loss`).

Each builder returns a pure function to bind into the step; class counts and
weights are small constants of the compiled step.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from imbal_jax import losses, metric_losses

CLASSIFICATION_LOSSES = ('ce', 'focal', 'cb', 'ldam_drw', 'logit_adjusted', 'balanced_softmax')
METRIC_LOSSES = ('supcon', 'balanced_supcon', 'triplet', 'class_center')


def drw_start_epoch(fraction: float, num_epochs: int) -> int:
  """The epoch re-weighting starts at: `fraction` of `num_epochs`, rounded down to a
  whole epoch (Cao et al. switch at an epoch boundary, 160 of 200). A product that
  rounding leaves just below a whole number (0.57 * 100 = 56.99999999999999) is that
  number, not the epoch before."""
  return math.floor(fraction * num_epochs + 1e-9)


def classification_loss(config, class_counts, steps_per_epoch: int) -> Callable:
  """(logits, labels, step) -> scalar, for `config.loss`:

  ce                plain cross-entropy
  focal             focal loss, gamma `focal_gamma` (Lin et al. 2017)
  cb                cross-entropy weighted by the effective number of samples,
                    beta `cb_beta` (Cui et al. 2019)
  ldam_drw          LDAM margins (`ldam_max_margin`, logit scale `ldam_scale`) with
                    class-balanced re-weighting deferred to `drw_start_fraction` of
                    training, at an epoch boundary (drw_start_epoch; Cao et al. 2019)
  logit_adjusted    logit-adjusted cross-entropy, `logit_adjust_tau` (Menon et al. 2021)
  balanced_softmax  balanced softmax (Ren et al. 2020)
  """
  counts = jnp.asarray(np.asarray(class_counts), jnp.float32)
  name = config.loss
  if name == 'ce':
    return lambda logits, labels, step: losses.softmax_cross_entropy(logits, labels)
  if name == 'focal':
    return lambda logits, labels, step: losses.focal_loss(logits, labels, gamma=config.focal_gamma)
  if name == 'cb':
    weights = losses.class_balanced_weights(counts, config.cb_beta)
    return lambda logits, labels, step: losses.weighted_cross_entropy(logits, labels, weights)
  if name == 'ldam_drw':
    weights = losses.class_balanced_weights(counts, config.cb_beta)
    drw_step = drw_start_epoch(config.drw_start_fraction, config.num_epochs) * steps_per_epoch

    def ldam(logits, labels, step):
      deferred = jnp.where(step >= drw_step, weights, jnp.ones_like(weights))
      return losses.ldam_loss(logits, labels, counts, max_margin=config.ldam_max_margin,
                              scale=config.ldam_scale, class_weights=deferred)
    return ldam
  if name == 'logit_adjusted':
    return lambda logits, labels, step: losses.logit_adjusted_cross_entropy(
        logits, labels, counts, tau=config.logit_adjust_tau)
  if name == 'balanced_softmax':
    return lambda logits, labels, step: losses.balanced_softmax_cross_entropy(
        logits, labels, counts)
  raise ValueError(f'config.loss={name!r} is not known; choose one of {CLASSIFICATION_LOSSES}.')


def metric_loss(config) -> Callable:
  """(embeddings, labels, centers) -> (scalar, new centers), for `config.metric_loss`:

  supcon           supervised contrastive, `temperature` (Khosla et al. 2020)
  balanced_supcon  its class-averaged denominator variant (after Zhu et al. 2022)
  triplet          batch-hard triplet, `margin` (Hermans et al. 2017)
  class_center     triplet loss against running class centres (momentum
                   `center_momentum`), updated inside the step
  """
  name = config.metric_loss
  if name == 'supcon':
    return lambda z, labels, centers: (
        losses.supervised_contrastive(z, labels, config.temperature), centers)
  if name == 'balanced_supcon':
    return lambda z, labels, centers: (
        metric_losses.balanced_supervised_contrastive(z, labels, config.temperature), centers)
  if name == 'triplet':
    return lambda z, labels, centers: (
        metric_losses.batch_hard_triplet(z, labels, config.margin), centers)
  if name == 'class_center':
    def class_center(z, labels, centers):
      value = metric_losses.class_center_triplet(z, labels, centers, config.margin)
      return value, metric_losses.update_centers(centers, z, labels, config.center_momentum)
    return class_center
  raise ValueError(f'config.metric_loss={name!r} is not known; choose one of {METRIC_LOSSES}.')
