"""Metric-learning losses on embeddings. Pure functions of arrays: no globals.

Batch-hard triplet, class-centre triplet (with its moving-average centre
update) and balanced supervised contrastive. Conventions as in `losses.py`:
`embeddings` [batch, dim] expected L2-normalised (the projection head's
output), integer `labels` [batch], optional `mask` [batch] (1 real, 0 padding;
a padded batch gives the value of the unpadded one).

Every loss is written over the whole batch ([batch, batch] matrices), so that
under jit over a batch-sharded array the compiler gathers the global batch and
every anchor sees every other example, as `losses.supervised_contrastive` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Pairwise products at full precision: at the default TPU precision (bfloat16
# passes) a unit-norm dot product is off by ~1e-2, which is the size of the
# distance differences the triplet hinge compares. The [batch, batch] product
# is cheap next to the encoder.
_PRECISION = jax.lax.Precision.HIGHEST


def _as_float(x: jax.Array) -> jax.Array:
  # bfloat16/float16 up to float32, float64 kept; integers (class counts) to
  # the default float, which is float64 when x64 is enabled (float64 checks).
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.result_type(float))
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask: jax.Array | None, batch: int, dtype) -> jax.Array:
  return jnp.ones((batch,), dtype) if mask is None else _as_float(mask).astype(dtype)


def _mean_over(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / sum(weights), 0 (with zero gradients) when nothing counts."""
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt that is 0, with zero gradient, at and below machine epsilon.

  d sqrt(x)/dx = 1 / (2 sqrt(x)) is infinite at 0 (identical embeddings, or a
  point at its class centre), and 0 * inf = NaN would poison the whole step.
  For unit vectors ||a||^2 + ||b||^2 - 2 a.b carries a rounding error of about
  eps, so anything below it is indistinguishable from 0 anyway.
  """
  eps = jnp.finfo(x.dtype).eps
  positive = x > eps
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances [len(a), len(b)] via ||a||^2 + ||b||^2 - 2 a.b.

  The matrix-product form (not a [n, m, dim] difference tensor) keeps memory
  at [n, m] and lets jit all-gather `b` when the batch is sharded.
  """
  squared = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]
             - 2.0 * jnp.matmul(a, b.T, precision=_PRECISION))
  return _safe_sqrt(jnp.maximum(squared, 0.0))


def batch_hard_triplet(embeddings: jax.Array, labels: jax.Array, margin: float,
                       mask: jax.Array | None = None) -> jax.Array:
  """Batch-hard triplet loss, Hermans et al. (2017), Sec. 2, the L_BH formula.

    l_a = max(0, margin + max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n))

  with d the Euclidean distance. The paper writes a sum over anchors; we take the
  mean over contributing anchors (real, with at least one positive and one
  negative in the batch), so the scale does not depend on the batch size or
  on how many rare-class singletons it holds. No contributing anchor gives 0.
  """
  z = _as_float(embeddings)
  batch = z.shape[0]
  valid = _valid(mask, batch, z.dtype)
  distances = _pairwise_distances(z, z)
  same = labels[:, None] == labels[None, :]
  real_other = (valid[None, :] > 0) & ~jnp.eye(batch, dtype=bool)
  positives = same & real_other
  negatives = ~same & (valid[None, :] > 0)
  has_positive = jnp.any(positives, axis=1)
  has_negative = jnp.any(negatives, axis=1)
  # Distances are >= 0, so 0 is a neutral filler for the max. For the min the
  # filler is above every distance in the row: finite (no inf in the
  # arithmetic of rows masked out later), never tied with a real negative,
  # and a constant, so no gradient leaks through it.
  hardest_positive = jnp.max(jnp.where(positives, distances, 0.0), axis=1)
  filler = jax.lax.stop_gradient(jnp.max(distances, axis=1, keepdims=True)) + 1.0
  hardest_negative = jnp.min(jnp.where(negatives, distances, filler), axis=1)
  per_anchor = jax.nn.relu(margin + hardest_positive - hardest_negative)
  contributing = valid * (has_positive & has_negative).astype(z.dtype)
  return _mean_over(per_anchor, contributing)


def class_center_triplet(embeddings: jax.Array, labels: jax.Array, centers: jax.Array,
                         margin: float, mask: jax.Array | None = None) -> jax.Array:
  """Triplet loss against class centres: the triplet-center loss L_tc of He et al. (2018).

    l_i = max(0, d(z_i, c_{y_i}) - min_{k != y_i} d(z_i, c_k) + margin)

  averaged over the real examples. `centers` [classes, dim] are L2-normalised
  class centres kept outside the model (see `update_centers`); they enter as
  constants here unless the caller differentiates with respect to them.
  Unlike He et al. (half squared distance) we use the Euclidean distance, as
  `batch_hard_triplet` does, so one margin means the same in both. Every class
  centre is a candidate negative, so rare classes absent from the batch still
  repel. With a single class there is no negative and the loss is 0.
  """
  z = _as_float(embeddings)
  c = _as_float(centers).astype(z.dtype)
  valid = _valid(mask, z.shape[0], z.dtype)
  distances = _pairwise_distances(z, c)
  own = jax.nn.one_hot(labels, c.shape[0], dtype=bool)
  to_own = jnp.sum(jnp.where(own, distances, 0.0), axis=1)
  # Own centre replaced by a constant above every distance for the min.
  filler = jax.lax.stop_gradient(jnp.max(distances, axis=1, keepdims=True)) + 1.0
  to_nearest_other = jnp.min(jnp.where(own, filler, distances), axis=1)
  has_other = jnp.any(~own, axis=1)
  per_anchor = jnp.where(has_other, jax.nn.relu(to_own - to_nearest_other + margin), 0.0)
  return _mean_over(per_anchor, valid)


def update_centers(centers: jax.Array, embeddings: jax.Array, labels: jax.Array,
                   momentum: float, mask: jax.Array | None = None) -> jax.Array:
  """Moving-average class centres, re-normalised to unit length.

    c_k <- normalise(momentum * c_k + (1 - momentum) * mean_{i: y_i = k} z_i)

  for each class k with at least one real example in the batch; other classes
  keep their centre unchanged. `momentum` is the weight of the old centre (as
  in batch-norm running statistics): 0 replaces it by the batch mean, 1 never
  moves. This replaces the gradient-style centre update of Wen et al. (2016),
  eq. 4, by an exponential moving average of the (global) batch's class means;
  renormalising keeps the centres on the sphere the embeddings live on.
  The embeddings are taken under stop_gradient: centres are state, not a path
  for gradients. If the blended centre is exactly zero (a batch mean opposite
  the old centre at momentum 0.5) the old centre is kept.
  """
  c = _as_float(centers)
  z = jax.lax.stop_gradient(_as_float(embeddings)).astype(c.dtype)
  c = jax.lax.stop_gradient(c)
  valid = _valid(mask, z.shape[0], c.dtype)
  membership = jax.nn.one_hot(labels, c.shape[0], dtype=c.dtype) * valid[:, None]
  counts = jnp.sum(membership, axis=0)
  # One [classes, batch] x [batch, dim] product: a global reduction under jit.
  sums = jnp.matmul(membership.T, z, precision=_PRECISION)
  present = counts > 0
  means = sums / jnp.where(present, counts, 1.0)[:, None]
  blended = momentum * c + (1.0 - momentum) * means
  norms = jnp.linalg.norm(blended, axis=1, keepdims=True)
  usable = present[:, None] & (norms > 0)
  renormalised = blended / jnp.where(usable, norms, 1.0)
  return jnp.where(usable, renormalised, c).astype(centers.dtype)


def balanced_supervised_contrastive(embeddings: jax.Array, labels: jax.Array,
                                    temperature: float,
                                    mask: jax.Array | None = None) -> jax.Array:
  """Supervised contrastive loss with a class-averaged denominator.

  After the "class-averaging" of Zhu et al. (2022), "Balanced Contrastive
  Learning for Long-Tailed Visual Recognition", Sec. 3 (the BCL loss without
  its class prototypes, "class-complement"). For anchor i, with A(i) the
  other real examples, A_k(i) those of class k, P(i) = A_{y_i}(i) and
  s_ia = z_i.z_a / t:

    D_i = sum_{k: A_k(i) nonempty} (1 / |A_k(i)|) sum_{a in A_k(i)} exp(s_ia)
    l_i = -1/|P(i)| sum_{p in P(i)} (s_ip - log D_i)

  and the loss is the mean of l_i over real anchors with |P(i)| >= 1 (others
  contribute nothing; a batch without any positive pair gives 0). Each class
  present among the other examples then weighs the same in D_i, whatever its
  batch size, so head classes do not dominate the negatives (Khosla et al.'s
  eq. 2 sums over A(i) directly). |A_k(i)| excludes the anchor itself; the
  authors' code divides by the class's batch count including the anchor.

  Computed as D_i = sum_{a in A(i)} exp(s_ia) / |A_{y_a}(i)|, so no number of
  classes is needed: |A_{y_a}(i)| = (real examples of class y_a) - [y_i = y_a].
  """
  z = _as_float(embeddings)
  batch = z.shape[0]
  valid = _valid(mask, batch, z.dtype)
  logits = jnp.matmul(z, z.T, precision=_PRECISION) / temperature
  same = (labels[:, None] == labels[None, :]).astype(z.dtype)
  candidates = (1.0 - jnp.eye(batch, dtype=z.dtype)) * valid[None, :]
  class_size = jnp.sum(same * valid[None, :], axis=1)  # real examples with a's label
  others_in_class = class_size[None, :] - same * valid[:, None]
  # A large negative number instead of -inf keeps gradients finite.
  log_terms = jnp.where(candidates > 0,
                        logits - jnp.log(jnp.maximum(others_in_class, 1.0)), -1e9)
  log_denominator = jax.nn.logsumexp(log_terms, axis=1)
  positives = same * candidates
  num_positives = jnp.sum(positives, axis=1)
  sum_positive_logits = jnp.sum(positives * logits, axis=1)
  per_anchor = log_denominator - sum_positive_logits / jnp.maximum(num_positives, 1.0)
  has_positive = (num_positives > 0).astype(z.dtype) * valid
  return _mean_over(per_anchor, has_positive)
