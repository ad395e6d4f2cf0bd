"""Losses against slow, obvious NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imbal_jax import losses


def supcon_reference(z, labels, temperature, mask=None):
  """Khosla et al. (2020) eq. 2, one anchor and one positive at a time."""
  z = np.asarray(z, np.float64)
  n = len(labels)
  valid = np.ones(n, bool) if mask is None else np.asarray(mask) > 0
  per_anchor = []
  for i in range(n):
    if not valid[i]:
      continue
    others = [a for a in range(n) if a != i and valid[a]]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    denominator = sum(np.exp(z[i] @ z[a] / temperature) for a in others)
    terms = [np.log(np.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]
    per_anchor.append(-np.mean(terms))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def random_embeddings(rng, n, dim=16):
  z = rng.normal(size=(n, dim))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_supcon_matches_reference_on_random_batch(temperature):
  rng = np.random.default_rng(0)
  z = random_embeddings(rng, 24)
  labels = rng.integers(0, 4, size=24)
  got = losses.supervised_contrastive(jnp.asarray(z, jnp.float32), jnp.asarray(labels), temperature)
  np.testing.assert_allclose(float(got), supcon_reference(z, labels, temperature), rtol=1e-5)


def test_supcon_anchors_without_positive_contribute_nothing():
  rng = np.random.default_rng(1)
  z = random_embeddings(rng, 10)
  # Classes 2, 3 and 4 appear once: those anchors have no positive.
  labels = np.array([0, 0, 0, 1, 1, 2, 3, 4, 1, 0])
  got = losses.supervised_contrastive(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.1)
  expected = supcon_reference(z, labels, 0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  grads = jax.grad(lambda e: losses.supervised_contrastive(e, jnp.asarray(labels), 0.1))(
      jnp.asarray(z, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))


def test_supcon_with_no_positive_pair_is_zero_not_nan():
  z = random_embeddings(np.random.default_rng(2), 6)
  labels = jnp.arange(6)
  value, grads = jax.value_and_grad(losses.supervised_contrastive)(
      jnp.asarray(z, jnp.float32), labels, 0.1)
  assert float(value) == 0.0
  assert np.all(np.asarray(grads) == 0.0)


def test_supcon_all_labels_equal():
  rng = np.random.default_rng(3)
  z = random_embeddings(rng, 12)
  labels = np.zeros(12, int)
  got = losses.supervised_contrastive(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.2)
  np.testing.assert_allclose(float(got), supcon_reference(z, labels, 0.2), rtol=1e-5)
  # Every other example is a positive: the loss is log(n - 1) minus the mean log-ratio >= 0.
  assert float(got) > 0


def test_supcon_mask_equals_dropping_padded_rows():
  rng = np.random.default_rng(4)
  z = random_embeddings(rng, 16)
  labels = rng.integers(0, 3, size=16)
  mask = np.array([1] * 11 + [0] * 5, np.float32)
  padded = losses.supervised_contrastive(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.1,
                                         jnp.asarray(mask))
  unpadded = losses.supervised_contrastive(jnp.asarray(z[:11], jnp.float32),
                                           jnp.asarray(labels[:11]), 0.1)
  np.testing.assert_allclose(float(padded), float(unpadded), rtol=1e-6)
  np.testing.assert_allclose(float(padded), supcon_reference(z, labels, 0.1, mask), rtol=1e-5)


def test_supcon_gradient_matches_finite_differences():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(8, 4))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2, 0, 1])
  f = lambda e: losses.supervised_contrastive(e, labels, 0.5)
  grads = np.asarray(jax.grad(f)(jnp.asarray(z, jnp.float32)))
  eps = 1e-3
  for (i, j) in [(0, 0), (3, 2), (7, 1)]:
    up, down = z.copy(), z.copy()
    up[i, j] += eps
    down[i, j] -= eps
    numeric = (supcon_reference(up, np.asarray(labels), 0.5) -
               supcon_reference(down, np.asarray(labels), 0.5)) / (2 * eps)
    np.testing.assert_allclose(grads[i, j], numeric, rtol=2e-2, atol=1e-4)


def test_cross_entropy_matches_reference_and_mask():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(10, 5))
  labels = rng.integers(0, 5, size=10)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  expected = -log_probs[np.arange(10), labels]
  got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected.mean(), rtol=1e-5)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
  got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                     jnp.asarray(mask))
  np.testing.assert_allclose(float(got), expected[mask > 0].mean(), rtol=1e-5)
