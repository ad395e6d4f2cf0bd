"""Metric-learning losses against slow, obvious NumPy references (loops, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imbal_jax import losses, metric_losses

DIM = 8
NUM_CLASSES = 4
MARGIN = 0.3
TEMPERATURE = 0.2


def distance(a, b):
  return float(np.sqrt(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def real_rows(n, mask):
  return [i for i in range(n) if mask is None or mask[i] > 0]


def batch_hard_reference(z, labels, margin, mask=None):
  """Hermans et al. (2017) batch hard, one anchor at a time; mean over anchors with a triplet."""
  rows = real_rows(len(labels), mask)
  per_anchor = []
  for a in rows:
    positives = [distance(z[a], z[p]) for p in rows if p != a and labels[p] == labels[a]]
    negatives = [distance(z[a], z[n]) for n in rows if labels[n] != labels[a]]
    if positives and negatives:
      per_anchor.append(max(0.0, margin + max(positives) - min(negatives)))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def class_center_reference(z, labels, centers, margin, mask=None):
  per_anchor = []
  for i in real_rows(len(labels), mask):
    own = distance(z[i], centers[labels[i]])
    others = [distance(z[i], c) for k, c in enumerate(centers) if k != labels[i]]
    per_anchor.append(max(0.0, own - min(others) + margin) if others else 0.0)
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def update_centers_reference(centers, z, labels, momentum, mask=None):
  new = np.array(centers, np.float64)
  rows = real_rows(len(labels), mask)
  for k in range(len(centers)):
    members = [z[i] for i in rows if labels[i] == k]
    if members:
      blended = momentum * new[k] + (1 - momentum) * np.mean(members, axis=0)
      new[k] = blended / np.linalg.norm(blended)
  return new


def balanced_supcon_reference(z, labels, temperature, mask=None):
  """The docstring's formula: per-class mean of exp(z_i.z_a / t), summed over classes."""
  z = np.asarray(z, np.float64)
  rows = real_rows(len(labels), mask)
  per_anchor = []
  for i in rows:
    others = [a for a in rows if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    classes = sorted({labels[a] for a in others})
    denominator = sum(
        np.mean([np.exp(z[i] @ z[a] / temperature) for a in others if labels[a] == k])
        for k in classes)
    per_anchor.append(
        -np.mean([np.log(np.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def unit_rows(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_batch(seed, n=12):
  """Unit embeddings and imbalanced labels (class 3 rare, often absent or a singleton)."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(NUM_CLASSES, size=n, p=[0.45, 0.3, 0.17, 0.08])
  return unit_rows(rng.normal(size=(n, DIM))), labels


CENTERS = unit_rows(np.random.default_rng(100).normal(size=(NUM_CLASSES, DIM)))

# Each entry: (loss(z, labels, mask), NumPy reference(z, labels, mask)).
METRIC_LOSSES = {
    'batch_hard': (
        lambda z, y, m: metric_losses.batch_hard_triplet(z, y, MARGIN, m),
        lambda z, y, m=None: batch_hard_reference(z, y, MARGIN, m)),
    'class_center': (
        lambda z, y, m: metric_losses.class_center_triplet(z, y, jnp.asarray(CENTERS, jnp.float32),
                                                           MARGIN, m),
        lambda z, y, m=None: class_center_reference(z, y, CENTERS, MARGIN, m)),
    'balanced_supcon': (
        lambda z, y, m: metric_losses.balanced_supervised_contrastive(z, y, TEMPERATURE, m),
        lambda z, y, m=None: balanced_supcon_reference(z, y, TEMPERATURE, m)),
}
# One jitted value-and-gradient per loss, always with a mask (ones: no padding).
VALUE_AND_GRAD = {name: jax.jit(jax.value_and_grad(loss))
                  for name, (loss, _) in METRIC_LOSSES.items()}


def value_and_grad(name, z, labels, mask=None):
  mask = np.ones(len(labels), np.float32) if mask is None else mask
  value, grads = VALUE_AND_GRAD[name](jnp.asarray(z, jnp.float32), jnp.asarray(labels),
                                      jnp.asarray(mask, jnp.float32))
  return float(value), np.asarray(grads)


@pytest.mark.parametrize('name', sorted(METRIC_LOSSES))
def test_metric_loss_matches_reference(name):
  _, reference = METRIC_LOSSES[name]
  values = []
  for seed in [0, 1, 2, 3]:
    z, labels = random_batch(seed)
    value, _ = value_and_grad(name, z, labels)
    np.testing.assert_allclose(value, reference(z, labels), rtol=1e-5, atol=1e-6)
    values.append(value)
  assert max(values) > 0.05  # the hinges are active: not a comparison of zeros


@pytest.mark.parametrize('name', sorted(METRIC_LOSSES))
def test_metric_loss_mask_equals_dropping_padded_rows(name):
  _, reference = METRIC_LOSSES[name]
  z, labels = random_batch(4)
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1], np.float32)
  keep = mask > 0
  padded, padded_grads = value_and_grad(name, z, labels, mask)
  unpadded, unpadded_grads = value_and_grad(name, z[keep], labels[keep])
  np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(padded, reference(z, labels, mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(padded_grads[keep], unpadded_grads, rtol=1e-4, atol=1e-6)
  assert np.all(padded_grads[~keep] == 0.0)


@pytest.mark.parametrize('name', sorted(METRIC_LOSSES))
def test_metric_loss_gradient_matches_finite_differences(name):
  # float32 gradient against float64 central differences of the reference.
  # The losses take any embeddings (normalising is the caller's job), so the
  # perturbed points need not stay on the sphere.
  _, reference = METRIC_LOSSES[name]
  z, labels = random_batch(5)
  _, grads = value_and_grad(name, z, labels)
  assert np.any(grads != 0.0)
  eps = 1e-4
  for (i, j) in [(0, 0), (3, 5), (7, 2), (11, 7), (6, 1)]:
    up, down = z.copy(), z.copy()
    up[i, j] += eps
    down[i, j] -= eps
    numeric = (reference(up, labels) - reference(down, labels)) / (2 * eps)
    np.testing.assert_allclose(grads[i, j], numeric, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize('name', sorted(METRIC_LOSSES))
@pytest.mark.parametrize('case', ['single_class', 'singletons_and_copies', 'duplicates'])
def test_metric_loss_degenerate_batches_are_finite(name, case):
  _, reference = METRIC_LOSSES[name]
  z, labels = random_batch(6)
  if case == 'single_class':  # no negatives at all
    labels = np.full(12, 2)
  elif case == 'singletons_and_copies':  # classes 0-2 once (no positive); class 3 nine times
    labels = np.array([0, 1, 2, 3] + [3] * 8)
    z[4:] = z[3]  # nine copies of one point: zero distances among positives
  else:  # identical points of the same and of different classes, and a point on its centre
    z[1] = z[0]
    z[2] = z[0]
    labels[:3] = [0, 0, 1]
    z[5] = CENTERS[labels[5]]
  value, grads = value_and_grad(name, z, labels)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grads))
  np.testing.assert_allclose(value, reference(z, labels), rtol=1e-4, atol=1e-5)


def test_batch_hard_without_any_triplet_is_zero_with_zero_gradient():
  z, _ = random_batch(7)
  # A margin above every possible distance gap: only the skipping gives 0.
  loss = jax.jit(jax.value_and_grad(metric_losses.batch_hard_triplet), static_argnums=2)
  for labels in [np.arange(12), np.zeros(12, int)]:  # no positive / no negative
    value, grads = loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 5.0)
    assert float(value) == 0.0
    assert np.all(np.asarray(grads) == 0.0)


def test_balanced_supcon_single_class_is_supcon_minus_log_count():
  # One class: D_i is the mean over the n - 1 others instead of their sum.
  z, _ = random_batch(8)
  labels = np.zeros(12, int)
  balanced, _ = value_and_grad('balanced_supcon', z, labels)
  plain = jax.jit(losses.supervised_contrastive)(jnp.asarray(z, jnp.float32),
                                                 jnp.asarray(labels), TEMPERATURE)
  np.testing.assert_allclose(balanced, float(plain) - np.log(11), rtol=1e-5)


def test_balanced_supcon_without_positive_pair_is_zero_with_zero_gradient():
  z, _ = random_batch(9)
  value, grads = value_and_grad('balanced_supcon', z, np.arange(12))
  assert value == 0.0
  assert np.all(grads == 0.0)


def test_class_center_with_one_class_is_zero():
  z, _ = random_batch(10)
  # No other centre is a negative; a margin of 5 exceeds any distance gap on
  # the sphere, so only the "no negative, no loss" rule gives 0.
  loss = jax.jit(metric_losses.class_center_triplet)(
      jnp.asarray(z, jnp.float32), jnp.zeros(12, jnp.int32), jnp.asarray(CENTERS[:1], jnp.float32),
      5.0)
  assert float(loss) == 0.0


update_centers = jax.jit(metric_losses.update_centers)


@pytest.mark.parametrize('momentum', [0.0, 0.5, 0.9])
def test_update_centers_matches_reference(momentum):
  z, labels = random_batch(11)
  labels[labels == 2] = 1  # class 2 absent from the batch
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1], np.float32)
  got = np.asarray(update_centers(jnp.asarray(CENTERS, jnp.float32), jnp.asarray(z, jnp.float32),
                                  jnp.asarray(labels), momentum, jnp.asarray(mask)))
  expected = update_centers_reference(CENTERS, z, labels, momentum, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[2], np.asarray(CENTERS[2], np.float32))  # kept exactly
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  if momentum == 0.0:  # the normalised batch mean of the real rows
    real_zeros = (labels == 0) & (mask > 0)
    np.testing.assert_allclose(got[0], unit_rows(z[real_zeros].mean(axis=0)[None])[0], rtol=1e-5)


def test_update_centers_momentum_one_keeps_centres_and_passes_no_gradient():
  z, labels = random_batch(12)
  ones = jnp.ones(12, jnp.float32)
  got = update_centers(jnp.asarray(CENTERS, jnp.float32), jnp.asarray(z, jnp.float32),
                       jnp.asarray(labels), 1.0, ones)
  np.testing.assert_allclose(np.asarray(got), CENTERS, rtol=1e-6, atol=1e-7)
  grads = jax.jit(jax.grad(lambda e: jnp.sum(
      metric_losses.update_centers(jnp.asarray(CENTERS, jnp.float32), e, jnp.asarray(labels),
                                   0.5, ones) * 1.7)))(jnp.asarray(z, jnp.float32))
  assert np.all(np.asarray(grads) == 0.0)


def test_losses_over_a_batch_sharded_on_8_devices_see_the_global_batch(devices):
  # Each device holds 2 of 16 rows; the references use all 16, so a per-shard
  # computation would not match.
  mesh = Mesh(np.array(devices), ('data',))
  by_row, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  z, labels = random_batch(13, n=16)
  mask = np.ones(16, np.float32)
  mask[[3, 10]] = 0.0
  args = [jax.device_put(jnp.asarray(a), by_row)
          for a in (z.astype(np.float32), labels, mask)]
  for name, (loss, reference) in METRIC_LOSSES.items():
    value = jax.jit(loss)(*args)
    np.testing.assert_allclose(float(value), reference(z, labels, mask), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  centers = jax.device_put(jnp.asarray(CENTERS, jnp.float32), replicated)
  got = jax.jit(metric_losses.update_centers)(centers, args[0], args[1], 0.5, args[2])
  expected = update_centers_reference(CENTERS, z, labels, 0.5, mask)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
