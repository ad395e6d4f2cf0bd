"""Loss functions. Pure functions of arrays: no globals, no module state.

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
  logits = (z @ z.T) / temperature
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
