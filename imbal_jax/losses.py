"""Cross-entropy family of losses. Pure functions of arrays: no globals, no module state.

Here: cross-entropy, supervised contrastive (the stage-1 pair), and the
one-stage imbalance losses on logits (focal, class-balanced, LDAM, logit
adjustment, balanced softmax). Losses on embeddings for metric learning
(triplet, class-centre, balanced contrastive) live in `metric_losses.py`.

Every loss takes an optional `mask` (1 for real examples, 0 for padding) so that
a padded batch gives the same value as the unpadded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean cross-entropy of integer `labels` under `logits` ([batch, classes])."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_example = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  if mask is None:
    mask = jnp.ones_like(per_example)
  return _masked_mean(per_example, mask.astype(jnp.float32))


def supervised_contrastive(
    embeddings: jax.Array,
    labels: jax.Array,
    temperature: float,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Supervised contrastive loss, the L_out form of Khosla et al. (2020), eq. 2.

  For anchor i with positives P(i) (same label, j != i) and all others A(i):

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

  and the loss is the mean of l_i over anchors that have at least one positive.
  Anchors with no positive in the batch (common for rare classes) contribute
  nothing; a batch with no positive pair at all gives 0, never NaN.

  `embeddings` are expected L2-normalised, shape [batch, dim]. When the batch
  is sharded over devices, jit gathers it for the [batch, batch] similarity
  matrix, so every anchor sees the whole global batch. Unlike the reference
  implementation we do not rescale by t / 0.07: `contrastive_weight` already
  sets the scale.
  """
  z = embeddings.astype(jnp.float32)
  batch = z.shape[0]
  valid = jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  # Full precision, as in metric_losses.py: default-precision passes (bfloat16 on TPU,
  # TF32 on recent NVIDIA GPUs) err by ~1e-3 on a unit-norm product, 1e-2 once divided
  # by a temperature of 0.1. The [batch, batch] product is cheap next to the encoder.
  logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  not_self = 1.0 - jnp.eye(batch, dtype=jnp.float32)
  # Candidates in the denominator: every other real example.
  candidates = not_self * valid[None, :]
  # A large negative number instead of -inf keeps gradients finite.
  masked_logits = jnp.where(candidates > 0, logits, -1e9)
  log_prob = masked_logits - jax.nn.logsumexp(masked_logits, axis=1, keepdims=True)
  positives = (labels[:, None] == labels[None, :]).astype(jnp.float32) * candidates
  num_positives = jnp.sum(positives, axis=1)
  sum_log_prob = jnp.sum(jnp.where(positives > 0, log_prob, 0.0), axis=1)
  per_anchor = -sum_log_prob / jnp.maximum(num_positives, 1.0)
  has_positive = (num_positives > 0).astype(jnp.float32) * valid
  return _masked_mean(per_anchor, has_positive)


# --- One-stage imbalance losses on logits -------------------------------------
#
# Shared conventions: `logits` [batch, classes], integer `labels` [batch],
# `class_counts` [classes] (training-set examples per class, an array so that
# it can be a traced argument of a jitted step), `mask` [batch] (1 real,
# 0 padding). Computation is in float32, or float64 when given float64 (tests).


def _as_float(x: jax.Array) -> jax.Array:
  # bfloat16/float16 up to float32, float64 kept; integers (class counts) to
  # the default float, which is float64 when x64 is enabled (float64 checks).
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.result_type(float))
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask_or_ones(mask: jax.Array | None, logits: jax.Array) -> jax.Array:
  if mask is None:
    return jnp.ones(logits.shape[:1], logits.dtype)
  return _as_float(mask).astype(logits.dtype)


def _label_log_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log softmax(logits)[label], per example."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _weighted_mean(per_example: jax.Array, labels: jax.Array,
                   class_weights: jax.Array | None, mask: jax.Array | None) -> jax.Array:
  """sum_i w_{y_i} m_i l_i / sum_i w_{y_i} m_i, and 0 when the denominator is 0.

  This is PyTorch's `cross_entropy(weight=w, reduction='mean')` normaliser, the
  one the LDAM-DRW reference code uses. With no weights it is the plain masked
  mean.
  """
  weights = jnp.ones_like(per_example) if mask is None else _as_float(mask)
  if class_weights is not None:
    weights = weights * _as_float(class_weights)[labels]
  total = jnp.sum(weights)
  # where, not maximum(total, 1): weights may be fractional, and total == 0
  # (only zero-weight or padded rows) must give 0 with zero gradients.
  return jnp.sum(per_example * weights) / jnp.where(total > 0, total, 1.0)


def _log_prior(class_counts: jax.Array) -> jax.Array:
  """log(n_c / sum_k n_k), with a zero count treated as one sample.

  The pseudo-count keeps log pi finite, so tau = 0 stays exactly plain
  cross-entropy / the identity instead of 0 * -inf = NaN. An empty class is
  never a training label, so this only decides how strongly it is pushed
  down in the softmax (still by ~log(total count)).
  """
  counts = jnp.maximum(_as_float(class_counts), 1.0)
  return jnp.log(counts) - jnp.log(jnp.sum(counts))


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0,
               class_weights: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
  """Softmax focal loss, Lin et al. (2017), eq. 5: FL = -alpha_t (1 - p_t)^gamma log p_t.

  gamma = 0 is cross-entropy. The optional `class_weights` [classes] play the
  role of alpha_t (with `class_balanced_weights`: a softmax form of the
  class-balanced focal loss of Cui et al. 2019, Sec. 4). The batch is
  normalised by the sum of the examples' weights, like `weighted_cross_entropy`,
  so focal with gamma = 0 equals it exactly. (Lin et al. normalise by the
  number of positive anchors, a detection-specific choice.)
  """
  logits = _as_float(logits)
  log_pt = _label_log_probs(logits, labels)
  # 1 - p_t through expm1 stays accurate for the easy examples (p_t -> 1) that
  # the focal term is about. The floor at `tiny` keeps d/dx x^gamma finite for
  # gamma < 1 at p_t == 1; its own gradient is 0 there, so nothing leaks.
  one_minus_pt = jnp.maximum(-jnp.expm1(log_pt), jnp.finfo(logits.dtype).tiny)
  per_example = -jnp.power(one_minus_pt, gamma) * log_pt
  return _weighted_mean(per_example, labels, class_weights, mask)


def class_balanced_weights(class_counts: jax.Array, beta: float = 0.9999) -> jax.Array:
  """Inverse effective number of samples, Cui et al. (2019), Prop. 1 and Sec. 4.

  E_n = (1 - beta^n) / (1 - beta) is the expected volume covered by n samples;
  w_c = 1 / E_{n_c} = (1 - beta) / (1 - beta^{n_c}), then rescaled so that the
  weights sum to the number of classes (as in the paper, so the total loss
  keeps roughly the scale of the unweighted one). beta = 0 gives all ones;
  beta -> 1 tends to inverse frequency. beta must be in [0, 1).

  A class with zero count gets weight 0 (it would be 1/0): it never appears as
  a training label, and 0 leaves the other classes' ratios as if it were not
  listed. The rest still sum to the number of classes.
  """
  counts = _as_float(class_counts)
  present = counts > 0
  # 1 - beta^n via expm1(n log beta) is accurate when beta is close to 1.
  # log(beta) = -inf for beta = 0 makes beta^n exactly 0 for n > 0, as wanted.
  safe_counts = jnp.where(present, counts, 1.0)
  one_minus_beta_n = -jnp.expm1(safe_counts * jnp.log(jnp.asarray(beta, counts.dtype)))
  raw = jnp.where(present, (1.0 - beta) / one_minus_beta_n, 0.0)
  total = jnp.sum(raw)  # 0 only if every count is 0: then all weights are 0
  return raw * (counts.shape[0] / jnp.where(total > 0, total, 1.0))


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
                           mask: jax.Array | None = None) -> jax.Array:
  """Class-weighted cross-entropy: sum_i w_{y_i} CE_i / sum_i w_{y_i} (real rows only).

  The normaliser is the sum of the batch's example weights, as PyTorch's
  `cross_entropy(weight=w, reduction='mean')`: the result is then invariant to
  rescaling `class_weights` and a batch of one class gives plain CE. Dividing
  by the batch size instead (Cui et al. 2019's code) changes the effective
  learning rate from batch to batch with the class mix.
  """
  per_example = -_label_log_probs(_as_float(logits), labels)
  return _weighted_mean(per_example, labels, class_weights, mask)


def ldam_margins(class_counts: jax.Array, max_margin: float = 0.5) -> jax.Array:
  """Per-class margins Delta_c = C / n_c^(1/4), Cao et al. (2019), eq. 13.

  C is chosen so the largest margin (the rarest class) equals `max_margin`, as
  in the authors' code. Classes with zero count are left out of that scaling
  and get `max_margin` (the rarest possible); they never appear as labels.
  """
  counts = _as_float(class_counts)
  present = counts > 0
  raw = jnp.where(present, jnp.power(jnp.where(present, counts, 1.0), -0.25), 0.0)
  largest = jnp.max(raw)
  margins = raw * (max_margin / jnp.where(largest > 0, largest, 1.0))
  return jnp.where(present, margins, max_margin)


def ldam_loss(logits: jax.Array, labels: jax.Array, class_counts: jax.Array,
              max_margin: float = 0.5, scale: float = 30.0,
              class_weights: jax.Array | None = None,
              mask: jax.Array | None = None) -> jax.Array:
  """LDAM loss, Cao et al. (2019), eq. 13: CE of s * (z - Delta_y e_y).

  The label's logit is lowered by its class margin (`ldam_margins`) before the
  softmax, so rare classes must win by a larger gap. The logits are expected
  to be cosine similarities (normalised features and classifier weights), for
  which the authors' code multiplies by s = 30; use scale = 1 on raw logits.

  Deferred re-weighting (DRW, Cao et al. 2019, Alg. 1): pass
  `class_weights=class_balanced_weights(class_counts, 0.9999)` after the
  deferral epoch, None before it. Weighted batches are normalised by the sum of
  the examples' weights, as in `weighted_cross_entropy` (and the authors' code).
  """
  logits = _as_float(logits)
  margins = ldam_margins(class_counts, max_margin).astype(logits.dtype)
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  label_margin = is_label * margins[labels][:, None]
  per_example = -_label_log_probs(scale * (logits - label_margin), labels)
  return _weighted_mean(per_example, labels, class_weights, mask)


def logit_adjusted_cross_entropy(logits: jax.Array, labels: jax.Array, class_counts: jax.Array,
                                 tau: float = 1.0, mask: jax.Array | None = None) -> jax.Array:
  """Logit-adjusted loss, Menon et al. (2021), eq. 10: CE of f(x) + tau * log pi.

  pi is the training label prior n_c / sum n. Adding the log prior during
  training lets the model's own logits estimate the balanced posterior, so
  plain argmax of the raw logits is Fisher-consistent for the balanced error.
  tau = 0 is plain cross-entropy. Zero counts: see `_log_prior`.
  """
  logits = _as_float(logits)
  adjusted = logits + tau * _log_prior(class_counts).astype(logits.dtype)
  return _masked_mean(-_label_log_probs(adjusted, labels), _mask_or_ones(mask, logits))


def posthoc_logit_adjustment(logits: jax.Array, class_counts: jax.Array,
                             tau: float = 1.0) -> jax.Array:
  """Post-hoc logit adjustment, Menon et al. (2021), eq. 9: f(x) - tau * log pi.

  For a model trained with plain cross-entropy; argmax of the result
  estimates the balanced-error Bayes classifier. tau = 0 is the identity.
  Works on logits of any leading shape [..., classes].
  """
  logits = _as_float(logits)
  return logits - tau * _log_prior(class_counts).astype(logits.dtype)


def balanced_softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                                   class_counts: jax.Array,
                                   mask: jax.Array | None = None) -> jax.Array:
  """Balanced softmax, Ren et al. (2020), eq. 4: p_y = n_y e^{z_y} / sum_c n_c e^{z_c}.

  That is cross-entropy of logits + log n_c, which equals the logit-adjusted
  loss with tau = 1 (softmax ignores the constant log sum n). Equal counts
  give plain cross-entropy. Zero counts are treated as one, like `_log_prior`.
  """
  logits = _as_float(logits)
  log_counts = jnp.log(jnp.maximum(_as_float(class_counts), 1.0)).astype(logits.dtype)
  return _masked_mean(-_label_log_probs(logits + log_counts, labels), _mask_or_ones(mask, logits))
