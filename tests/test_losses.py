"""Losses against slow, obvious NumPy references."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imbal_jax import losses


# Jitted once: a test then pays one compilation per shape instead of one per
# primitive in eager mode (about 7x less on CPU), and jit-compatibility is tested too.
supcon = jax.jit(losses.supervised_contrastive)


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
  got = supcon(jnp.asarray(z, jnp.float32), jnp.asarray(labels), temperature)
  np.testing.assert_allclose(float(got), supcon_reference(z, labels, temperature), rtol=1e-5)


def test_supcon_anchors_without_positive_contribute_nothing():
  rng = np.random.default_rng(1)
  z = random_embeddings(rng, 10)
  # Classes 2, 3 and 4 appear once: those anchors have no positive.
  labels = np.array([0, 0, 0, 1, 1, 2, 3, 4, 1, 0])
  got = supcon(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.1)
  expected = supcon_reference(z, labels, 0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  grads = jax.jit(jax.grad(lambda e: supcon(e, jnp.asarray(labels), 0.1)))(
      jnp.asarray(z, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))


def test_supcon_with_no_positive_pair_is_zero_not_nan():
  z = random_embeddings(np.random.default_rng(2), 6)
  labels = jnp.arange(6)
  value, grads = jax.jit(jax.value_and_grad(losses.supervised_contrastive))(
      jnp.asarray(z, jnp.float32), labels, 0.1)
  assert float(value) == 0.0
  assert np.all(np.asarray(grads) == 0.0)


def test_supcon_all_labels_equal():
  rng = np.random.default_rng(3)
  z = random_embeddings(rng, 12)
  labels = np.zeros(12, int)
  got = supcon(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.2)
  np.testing.assert_allclose(float(got), supcon_reference(z, labels, 0.2), rtol=1e-5)
  # Every other example is a positive: the loss is log(n - 1) minus the mean log-ratio >= 0.
  assert float(got) > 0


def test_supcon_mask_equals_dropping_padded_rows():
  rng = np.random.default_rng(4)
  z = random_embeddings(rng, 16)
  labels = rng.integers(0, 3, size=16)
  mask = np.array([1] * 11 + [0] * 5, np.float32)
  padded = supcon(jnp.asarray(z, jnp.float32), jnp.asarray(labels), 0.1, jnp.asarray(mask))
  unpadded = supcon(jnp.asarray(z[:11], jnp.float32), jnp.asarray(labels[:11]), 0.1)
  np.testing.assert_allclose(float(padded), float(unpadded), rtol=1e-6)
  np.testing.assert_allclose(float(padded), supcon_reference(z, labels, 0.1, mask), rtol=1e-5)


def test_supcon_gradient_matches_finite_differences():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(8, 4))
  labels = jnp.asarray([0, 0, 1, 1, 2, 2, 0, 1])
  f = lambda e: supcon(e, labels, 0.5)
  grads = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(z, jnp.float32)))
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


# --- One-stage imbalance losses on logits -------------------------------------
# References: one example at a time, float64, written from the papers' formulas.


def log_softmax_row(row):
  row = np.asarray(row, np.float64)
  top = row.max()
  return row - top - np.log(np.sum(np.exp(row - top)))


def weighted_average(per_example, weights):
  """sum w l / sum w over the listed examples, 0 when there is no weight."""
  total = sum(weights)
  return sum(w * l for w, l in zip(weights, per_example)) / total if total > 0 else 0.0


def focal_reference(logits, labels, gamma, class_weights=None, mask=None):
  """Lin et al. (2017) eq. 5 per example; with gamma = 0 the weighted cross-entropy."""
  per_example, weights = [], []
  for i, label in enumerate(labels):
    if mask is not None and mask[i] == 0:
      continue
    p = np.exp(log_softmax_row(logits[i])[label])
    per_example.append(-(1.0 - p) ** gamma * np.log(p))
    weights.append(1.0 if class_weights is None else class_weights[label])
  return weighted_average(per_example, weights)


def ldam_margins_reference(counts, max_margin):
  largest = max(n ** -0.25 for n in counts if n > 0)
  return [max_margin * n ** -0.25 / largest if n > 0 else max_margin for n in counts]


def ldam_reference(logits, labels, counts, max_margin, scale, class_weights=None, mask=None):
  margins = ldam_margins_reference(counts, max_margin)
  per_example, weights = [], []
  for i, label in enumerate(labels):
    if mask is not None and mask[i] == 0:
      continue
    row = np.array(logits[i], np.float64)
    row[label] -= margins[label]
    per_example.append(-log_softmax_row(scale * row)[label])
    weights.append(1.0 if class_weights is None else class_weights[label])
  return weighted_average(per_example, weights)


def logit_adjusted_reference(logits, labels, counts, tau, mask=None):
  counts = [max(n, 1) for n in counts]
  prior = [n / sum(counts) for n in counts]
  per_example = []
  for i, label in enumerate(labels):
    if mask is None or mask[i] > 0:
      row = [logits[i][c] + tau * np.log(prior[c]) for c in range(len(counts))]
      per_example.append(-log_softmax_row(row)[label])
  return float(np.mean(per_example)) if per_example else 0.0


def balanced_softmax_reference(logits, labels, counts, mask=None):
  """Ren et al. (2020) eq. 4 in probability space: n_y e^{z_y} / sum_c n_c e^{z_c}."""
  per_example = []
  for i, label in enumerate(labels):
    if mask is None or mask[i] > 0:
      scores = [max(n, 1) * np.exp(logits[i][c]) for c, n in enumerate(counts)]
      per_example.append(-np.log(scores[label] / sum(scores)))
  return float(np.mean(per_example))


COUNTS = np.array([500, 120, 30, 7, 2])

# Jitted entry points for the tests below (see `supcon` above for why).
jitted = types.SimpleNamespace(**{name: jax.jit(getattr(losses, name)) for name in [
    'softmax_cross_entropy', 'focal_loss', 'weighted_cross_entropy', 'class_balanced_weights',
    'ldam_margins', 'ldam_loss', 'posthoc_logit_adjustment', 'logit_adjusted_cross_entropy',
    'balanced_softmax_cross_entropy']})


def random_logits(seed, n=12, classes=5, absent=None):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=(n, classes))
  choices = [c for c in range(classes) if c != absent]
  return logits, rng.choice(choices, size=n)


def f32(x):
  return jnp.asarray(x, jnp.float32)


# Each entry: (loss(logits, labels, mask), NumPy reference(logits, labels, mask)).
CB = np.asarray([0.3, 1.7, 0.5, 2.0, 0.5])
LOGIT_LOSSES = {
    'focal': (lambda l, y, m: losses.focal_loss(l, y, 2.0, mask=m),
              lambda l, y, m=None: focal_reference(l, y, 2.0, mask=m)),
    'focal_weighted': (lambda l, y, m: losses.focal_loss(l, y, 0.5, jnp.asarray(CB), m),
                       lambda l, y, m=None: focal_reference(l, y, 0.5, CB, m)),
    'weighted_ce': (lambda l, y, m: losses.weighted_cross_entropy(l, y, jnp.asarray(CB), m),
                    lambda l, y, m=None: focal_reference(l, y, 0.0, CB, m)),
    'ldam': (lambda l, y, m: losses.ldam_loss(l, y, jnp.asarray(COUNTS), 0.5, 4.0, mask=m),
             lambda l, y, m=None: ldam_reference(l, y, COUNTS, 0.5, 4.0, mask=m)),
    'ldam_drw': (lambda l, y, m: losses.ldam_loss(l, y, jnp.asarray(COUNTS), 0.3, 2.0,
                                                  jnp.asarray(CB), m),
                 lambda l, y, m=None: ldam_reference(l, y, COUNTS, 0.3, 2.0, CB, m)),
    'logit_adjusted': (
        lambda l, y, m: losses.logit_adjusted_cross_entropy(l, y, jnp.asarray(COUNTS), 1.5, m),
        lambda l, y, m=None: logit_adjusted_reference(l, y, COUNTS, 1.5, m)),
    'balanced_softmax': (
        lambda l, y, m: losses.balanced_softmax_cross_entropy(l, y, jnp.asarray(COUNTS), m),
        lambda l, y, m=None: balanced_softmax_reference(l, y, COUNTS, m)),
}
# One jitted value-and-gradient per loss, always with a mask (all ones for
# "no padding"), so each loss compiles once.
LOGIT_VALUE_AND_GRAD = {name: jax.jit(jax.value_and_grad(loss))
                        for name, (loss, _) in LOGIT_LOSSES.items()}


def logit_value_and_grad(name, logits, labels, mask=None):
  mask = np.ones(len(labels), np.float32) if mask is None else mask
  value, grads = LOGIT_VALUE_AND_GRAD[name](f32(logits), jnp.asarray(labels), jnp.asarray(mask))
  return float(value), np.asarray(grads)


@pytest.mark.parametrize('name', sorted(LOGIT_LOSSES))
def test_logit_loss_matches_reference(name):
  _, reference = LOGIT_LOSSES[name]
  # Seed 2 leaves class 3 out of the batch: an empty class changes nothing.
  for seed in [0, 1, 2]:
    logits, labels = random_logits(seed, absent=3 if seed == 2 else None)
    value, _ = logit_value_and_grad(name, logits, labels)
    np.testing.assert_allclose(value, reference(logits, labels), rtol=2e-5)


@pytest.mark.parametrize('name', sorted(LOGIT_LOSSES))
def test_logit_loss_mask_equals_dropping_padded_rows(name):
  _, reference = LOGIT_LOSSES[name]
  logits, labels = random_logits(7)
  mask = np.array([1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], np.float32)
  keep = mask > 0
  padded, padded_grads = logit_value_and_grad(name, logits, labels, mask)
  # The reference on the batch with the padded rows removed (no second compiled
  # shape: the logit losses are per-example, so this is the unpadded value).
  np.testing.assert_allclose(padded, reference(logits[keep], labels[keep]), rtol=2e-5)
  np.testing.assert_allclose(padded, reference(logits, labels, mask), rtol=2e-5)
  assert np.all(padded_grads[~keep] == 0.0)
  assert np.all(np.any(padded_grads[keep] != 0.0, axis=1))


@pytest.mark.parametrize('name', sorted(LOGIT_LOSSES))
def test_logit_loss_gradient_matches_finite_differences(name):
  # float32 gradient against float64 central differences of the reference:
  # the difference error (~eps^2) is far below float32 rounding.
  _, reference = LOGIT_LOSSES[name]
  logits, labels = random_logits(8)
  _, grads = logit_value_and_grad(name, logits, labels)
  eps = 1e-4
  for (i, j) in [(0, 0), (2, 3), (5, 4), (4, labels[4])]:
    up, down = logits.copy(), logits.copy()
    up[i, j] += eps
    down[i, j] -= eps
    numeric = (reference(up, labels) - reference(down, labels)) / (2 * eps)
    np.testing.assert_allclose(grads[i, j], numeric, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('name', sorted(LOGIT_LOSSES))
def test_logit_loss_single_class_and_confident_batches_are_finite(name):
  # One class only, and logits so confident that p_t rounds to 1 in float32.
  logits = np.zeros((12, 5))
  logits[:, 4] = 60.0
  value, grads = logit_value_and_grad(name, logits, np.full(12, 4))
  assert np.isfinite(value)
  assert np.all(np.isfinite(grads))


def test_focal_with_gamma_zero_is_cross_entropy():
  logits, labels = random_logits(9)
  focal = jitted.focal_loss(f32(logits), jnp.asarray(labels), 0.0)
  ce = jitted.softmax_cross_entropy(f32(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(focal), float(ce), rtol=1e-6)
  weighted = jitted.focal_loss(f32(logits), jnp.asarray(labels), 0.0, jnp.asarray(CB))
  np.testing.assert_allclose(
      float(weighted),
      float(jitted.weighted_cross_entropy(f32(logits), jnp.asarray(labels), jnp.asarray(CB))),
      rtol=1e-6)
  # And gamma > 0 down-weights every example, so the loss is strictly smaller.
  assert float(jitted.focal_loss(f32(logits), jnp.asarray(labels), 2.0)) < float(ce)


def test_focal_gradient_is_finite_for_gamma_below_one_at_certainty():
  logits, labels = random_logits(15)
  logits[0] = 0.0
  logits[0, labels[0]] = 80.0  # p_t == 1 in float32: d(1 - p_t)^0.5 would be infinite
  grads = jax.jit(jax.grad(losses.focal_loss))(f32(logits), jnp.asarray(labels), 0.5)
  assert np.all(np.isfinite(np.asarray(grads)))
  assert np.any(np.asarray(grads)[1:] != 0.0)


def test_class_balanced_weights_match_effective_number_formula():
  counts = [100, 10, 1]
  for beta in [0.9, 0.99, 0.5]:
    inverse_effective = [(1 - beta) / (1 - beta ** n) for n in counts]
    expected = [3 * w / sum(inverse_effective) for w in inverse_effective]
    got = jitted.class_balanced_weights(jnp.asarray(counts), beta)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(got)), 3.0, rtol=1e-6)
  # beta = 0: every class has effective number 1, so no re-weighting.
  np.testing.assert_allclose(np.asarray(jitted.class_balanced_weights(jnp.asarray(counts), 0.0)),
                             [1.0, 1.0, 1.0], rtol=1e-6)
  # beta -> 1: inverse frequency, rescaled to sum to 3.
  got = jitted.class_balanced_weights(jnp.asarray(counts), 0.999999)
  np.testing.assert_allclose(np.asarray(got), np.array([0.01, 0.1, 1.0]) * 3 / 1.11, rtol=1e-3)


def test_class_balanced_weights_zero_count_gets_zero_weight():
  got = np.asarray(jitted.class_balanced_weights(jnp.asarray([100, 0, 10]), 0.99))
  without = np.asarray(jitted.class_balanced_weights(jnp.asarray([100, 10]), 0.99))
  assert got[1] == 0.0
  np.testing.assert_allclose(got.sum(), 3.0, rtol=1e-6)
  np.testing.assert_allclose(got[0] / got[2], without[0] / without[1], rtol=1e-5)


def test_weighted_cross_entropy_uniform_weights_and_zero_weight_batch():
  logits, labels = random_logits(10)
  ce = jitted.softmax_cross_entropy(f32(logits), jnp.asarray(labels))
  for scale in [1.0, 3.5]:
    got = jitted.weighted_cross_entropy(f32(logits), jnp.asarray(labels), jnp.full((5,), scale))
    np.testing.assert_allclose(float(got), float(ce), rtol=1e-6)
  # Only zero-weight examples: 0, not NaN, with zero gradients.
  weights = jnp.asarray([0.0, 1.0, 1.0, 1.0, 1.0])
  value, grads = jax.jit(jax.value_and_grad(losses.weighted_cross_entropy))(
      f32(logits), jnp.zeros(12, jnp.int32), weights)
  assert float(value) == 0.0
  assert np.all(np.asarray(grads) == 0.0)


def test_ldam_margins_match_formula_on_hand_made_counts():
  # n^(-1/4): 16 -> 1/2, 1 -> 1, 81 -> 1/3; the largest (class 1) becomes 0.5.
  got = jitted.ldam_margins(jnp.asarray([16, 1, 81]), 0.5)
  np.testing.assert_allclose(np.asarray(got), [0.25, 0.5, 0.5 / 3], rtol=1e-6)
  got = jitted.ldam_margins(jnp.asarray([16, 0, 81]), 0.4)
  np.testing.assert_allclose(np.asarray(got), [0.4, 0.4, 0.4 * 2 / 3], rtol=1e-6)


def test_ldam_with_zero_margin_and_unit_scale_is_cross_entropy():
  logits, labels = random_logits(11)
  got = jitted.ldam_loss(f32(logits), jnp.asarray(labels), jnp.asarray(COUNTS), 0.0, 1.0)
  ce = jitted.softmax_cross_entropy(f32(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), float(ce), rtol=1e-6)


def test_posthoc_adjustment_tau_zero_is_identity_and_favours_rare_classes():
  logits, _ = random_logits(12)
  got = jitted.posthoc_logit_adjustment(f32(logits), jnp.asarray(COUNTS), 0.0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(f32(logits)))
  # Equal logits become -log(prior): rare classes get the largest boost.
  counts = jnp.asarray([900, 90, 9, 0, 1])  # the empty class counts as one
  got = np.asarray(jitted.posthoc_logit_adjustment(jnp.zeros((12, 5)), counts, 1.0))
  np.testing.assert_allclose(got[3], -np.log(np.array([900, 90, 9, 1, 1]) / 1001), rtol=1e-5)


def test_logit_adjusted_tau_zero_and_balanced_softmax_equal_counts_are_cross_entropy():
  logits, labels = random_logits(13)
  logits, labels, counts = f32(logits), jnp.asarray(labels), jnp.asarray(COUNTS)
  ce = float(jitted.softmax_cross_entropy(logits, labels))
  got = jitted.logit_adjusted_cross_entropy(logits, labels, counts, 0.0)
  np.testing.assert_allclose(float(got), ce, rtol=1e-6)
  got = jitted.balanced_softmax_cross_entropy(logits, labels, jnp.full((5,), 40))
  np.testing.assert_allclose(float(got), ce, rtol=1e-6)
  # Balanced softmax is logit adjustment with tau = 1 (softmax is shift-invariant).
  balanced = jitted.balanced_softmax_cross_entropy(logits, labels, counts)
  adjusted = jitted.logit_adjusted_cross_entropy(logits, labels, counts)
  np.testing.assert_allclose(float(balanced), float(adjusted), rtol=1e-5)
  assert abs(float(balanced) - ce) > 1e-2


def test_zero_class_counts_give_finite_values_and_gradients_under_jit():
  logits, labels = random_logits(14, absent=1)
  counts = [50, 0, 10, 3, 1]
  references = {
      losses.ldam_loss: lambda: ldam_reference(logits, labels, counts, 0.5, 30.0),
      losses.logit_adjusted_cross_entropy:
          lambda: logit_adjusted_reference(logits, labels, counts, 1.0),
      losses.balanced_softmax_cross_entropy:
          lambda: balanced_softmax_reference(logits, labels, counts),
  }
  for loss, reference in references.items():
    # class_counts is a traced argument: no closure over Python constants.
    value, grads = jax.jit(jax.value_and_grad(loss))(f32(logits), jnp.asarray(labels),
                                                     jnp.asarray(counts))
    assert np.all(np.isfinite(np.asarray(grads))), loss.__name__
    # The documented zero-count rules (margin max_margin; log prior of one sample).
    np.testing.assert_allclose(float(value), reference(), rtol=1e-5, err_msg=loss.__name__)
  adjusted = jitted.posthoc_logit_adjustment(f32(logits), jnp.asarray(counts), 1.0)
  assert np.all(np.isfinite(np.asarray(adjusted)))
