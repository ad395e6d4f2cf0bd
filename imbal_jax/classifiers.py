"""Stage-2 classifiers on the frozen stage-1 encoder (`config.stage2_method`).

Every method is a frozen trunk (what stage 2 never changes) under a head (what
it trains or computes), so a stage-2 model is always head(trunk(images)) with
variables {'encoder': trunk variables, 'head': {'params': head parameters}}:
the training loop, evaluation, best/ and predict.py treat all methods alike.

- crt: trunk = encoder; head = a new linear layer trained with class-balanced
  sampling (classifier re-training, Kang et al. 2020).
- lws: trunk = encoder + stage-1 classifier (its logits); head = one scale per
  class, initialised to 1, trained with class-balanced sampling (learnable
  weight scaling, Kang et al. 2020).
- tau_norm: trunk = encoder; head = the stage-1 classifier with class c's
  weight vector w_c and bias b_c divided by ||w_c||^tau (Kang et al. 2020).
  Kang et al. use a classifier without bias; scaling the bias with its weight
  vector divides class c's logit by ||w_c||^tau, so tau = 0 is exactly the
  stage-1 classifier.
- posthoc_la: trunk = encoder; head = the stage-1 classifier with bias
  b - tau * log(prior), prior = training class frequencies (post-hoc logit
  adjustment, Menon et al. 2021, eq. 9; losses.posthoc_logit_adjustment).
- ncm: trunk = encoder; head = cosine similarity between the L2-normalised
  features and the class means of the L2-normalised training features (nearest
  class mean, Kang et al. 2020), times NCM_SCALE.

tau_norm and posthoc_la choose tau on the validation split; tau_norm,
posthoc_la and ncm need no training steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from imbal_jax import losses
from imbal_jax.models import LinearHead, encoder_variables

METHODS = ('crt', 'lws', 'tau_norm', 'posthoc_la', 'ncm')
TRAINED_METHODS = ('crt', 'lws')
# Cosine similarities lie in [-1, 1]: unscaled, their softmax over the classes is
# nearly flat. 16 is within the scales cosine classifiers use (about 10 to 30,
# e.g. Gidaris & Komodakis 2018 learn about 10, Wang et al. 2018 use 30). It
# changes the probabilities (calibration, ECE), never the predicted class.
NCM_SCALE = 16.0


class Stage1Classifier(nn.Module):
  """The stage-1 encoder and classifier as one network: images -> stage-1 logits.

  Its variables are named as in Stage1Net ('encoder', 'classifier'), so the
  stage-1 checkpoint's parts drop in unchanged.
  """

  encoder: nn.Module
  num_classes: int

  def setup(self):
    self.classifier = LinearHead(self.num_classes)

  def __call__(self, images, train: bool = False):
    return self.classifier(self.encoder(images, train=train))


class ClassScale(nn.Module):
  """Learnable weight scaling: class c's logit times a learned scale s_c (init 1)."""

  num_classes: int

  @nn.compact
  def __call__(self, logits):
    return logits * self.param('scale', nn.initializers.ones, (self.num_classes,))


def _unit_rows(x, axis: int = -1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class CosineHead(nn.Module):
  """scale * cos(features, class mean): the nearest-class-mean classifier as logits.

  `class_means` are parameters only so that checkpoints and predict.py handle
  them like any head; they are computed (class_means), never trained.
  """

  num_classes: int
  scale: float = NCM_SCALE

  @nn.compact
  def __call__(self, features):
    means = self.param('class_means', nn.initializers.zeros,
                       (self.num_classes, features.shape[-1]))
    return self.scale * _unit_rows(features) @ means.T


def modules(method: str, encoder: nn.Module, num_classes: int) -> tuple[nn.Module, nn.Module]:
  """(trunk, head) of a stage-2 method; see the module docstring."""
  if method == 'lws':
    return Stage1Classifier(encoder=encoder, num_classes=num_classes), ClassScale(num_classes)
  if method == 'ncm':
    return encoder, CosineHead(num_classes)
  if method in ('crt', 'tau_norm', 'posthoc_la'):
    return encoder, LinearHead(num_classes)
  raise ValueError(f'unknown stage-2 method {method!r}; choose one of {METHODS}.')


def trunk_variables(method: str, stage1_variables) -> dict:
  """The frozen trunk's variables, taken from the stage-1 checkpoint."""
  params, batch_stats = stage1_variables['params'], stage1_variables['batch_stats']
  if method == 'lws':
    return {'params': {'encoder': params['encoder'], 'classifier': params['classifier']},
            'batch_stats': {'encoder': batch_stats['encoder']}}
  return encoder_variables(params, batch_stats)


def tau_normalized(kernel: np.ndarray, bias: np.ndarray, tau: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """kernel [features, classes] and bias [classes] with class c's divided by ||w_c||^tau."""
  norms = np.linalg.norm(kernel, axis=0) ** tau
  return kernel / norms, bias / norms


def logit_adjusted(kernel: np.ndarray, bias: np.ndarray, class_counts: Sequence[int],
                   tau: float) -> tuple[np.ndarray, np.ndarray]:
  """The linear classifier whose logits are the given one's minus tau * log(prior)."""
  return kernel, np.asarray(losses.posthoc_logit_adjustment(bias, jnp.asarray(class_counts), tau))


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[classes, dim] unit-length means of the unit-length features of each class.

  A class without training examples gets a zero row: cosine 0 to everything.
  """
  unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  sums = np.zeros((num_classes, features.shape[-1]), np.float64)
  np.add.at(sums, labels, unit)
  return sums / np.maximum(np.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)


def tau_grid(maximum: float, step: float) -> tuple[float, ...]:
  """0, step, 2 step, ... up to `maximum` (inclusive), rounded to step's precision."""
  count = int(np.floor(maximum / step + 1e-9))
  return tuple(round(i * step, 10) for i in range(count + 1))


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def choose_tau(linear_for_tau: Callable[[float], tuple[np.ndarray, np.ndarray]],
               val_features: np.ndarray, score_fn: Callable[[np.ndarray], float],
               grid: Sequence[float]) -> tuple[float, dict[float, float]]:
  """The grid's tau whose linear classifier scores best on validation, and every score.

  `linear_for_tau(tau)` gives (kernel, bias); `score_fn` maps validation
  probabilities to the selection metric. Ties go to the smallest tau (the
  least change to stage 1).
  """
  scores = {}
  for tau in grid:
    kernel, bias = linear_for_tau(tau)
    logits = val_features.astype(np.float64) @ kernel.astype(np.float64) + bias
    scores[tau] = float(score_fn(_softmax(logits)))
  # Rounded first: scores equal in exact arithmetic (a mean of per-class recalls summed
  # in another order) can differ in the last bit, which must not break the tie.
  best = max(grid, key=lambda tau: (round(scores[tau], 9), -tau))
  return best, scores


def linear_params(kernel: np.ndarray, bias: np.ndarray) -> dict:
  """LinearHead parameters holding (kernel, bias)."""
  return {'dense': {'kernel': jnp.asarray(kernel, jnp.float32),
                    'bias': jnp.asarray(bias, jnp.float32)}}


def ncm_probabilities(features: np.ndarray, means: np.ndarray, scale: float = NCM_SCALE
                      ) -> np.ndarray:
  """CosineHead's probabilities, on the host."""
  unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  return _softmax(scale * unit.astype(np.float64) @ means.T)
