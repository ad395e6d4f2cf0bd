"""The config's choice of losses reaches the step as the matching pure function."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imbal_jax import losses, metric_losses, objectives, stages
from imbal_jax.models import Stage1Net, make_encoder

COUNTS = [50, 20, 5]


def config(**fields):
  base = dict(loss='ce', focal_gamma=2.0, cb_beta=0.99, ldam_max_margin=0.5, ldam_scale=1.0,
              drw_start_fraction=0.5, logit_adjust_tau=1.0, num_epochs=4, metric_loss='supcon',
              temperature=0.1, margin=0.2, center_momentum=0.9, grad_accum_steps=1)
  base.update(fields)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 12))
  z = rng.normal(size=(12, 8))
  return logits, labels, jnp.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), jnp.float32)


@pytest.mark.parametrize('name,expected', [
    ('ce', lambda l, y, c: losses.softmax_cross_entropy(l, y)),
    ('focal', lambda l, y, c: losses.focal_loss(l, y, gamma=2.0)),
    ('cb', lambda l, y, c: losses.weighted_cross_entropy(l, y, losses.class_balanced_weights(c, 0.99))),
    ('logit_adjusted', lambda l, y, c: losses.logit_adjusted_cross_entropy(l, y, c, tau=1.0)),
    ('balanced_softmax', lambda l, y, c: losses.balanced_softmax_cross_entropy(l, y, c)),
])
def test_classification_losses_are_the_named_functions(batch, name, expected):
  logits, labels, _ = batch
  fn = objectives.classification_loss(config(loss=name), COUNTS, steps_per_epoch=10)
  counts = jnp.asarray(COUNTS, jnp.float32)
  np.testing.assert_allclose(float(fn(logits, labels, 0)), float(expected(logits, labels, counts)),
                             rtol=1e-6)
  if name != 'ce':  # each differs from plain CE on imbalanced counts
    assert abs(float(fn(logits, labels, 0)) -
               float(losses.softmax_cross_entropy(logits, labels))) > 1e-4


def test_ldam_drw_defers_class_weights_to_its_start_step(batch):
  logits, labels, _ = batch
  fn = objectives.classification_loss(config(loss='ldam_drw'), COUNTS, steps_per_epoch=10)
  counts = jnp.asarray(COUNTS, jnp.float32)
  plain = losses.ldam_loss(logits, labels, counts, max_margin=0.5, scale=1.0)
  weighted = losses.ldam_loss(logits, labels, counts, max_margin=0.5, scale=1.0,
                              class_weights=losses.class_balanced_weights(counts, 0.99))
  # drw_start_fraction 0.5 of 4 epochs x 10 steps: step 20.
  np.testing.assert_allclose(float(fn(logits, labels, 19)), float(plain), rtol=1e-6)
  np.testing.assert_allclose(float(fn(logits, labels, 20)), float(weighted), rtol=1e-6)


def test_drw_starts_at_the_fraction_of_the_epochs_rounded_down_exactly():
  from fractions import Fraction
  for epochs in range(1, 301):
    for hundredths in range(1, 100):
      fraction = hundredths / 100
      # Exact rational arithmetic: floor(hundredths * epochs / 100).
      expected = int(Fraction(hundredths, 100) * epochs)
      assert objectives.drw_start_epoch(fraction, epochs) == expected, (fraction, epochs)
  assert 0.57 * 100 < 57  # the float product the rounding guards against


def test_metric_losses_and_class_centres(batch):
  _, labels, z = batch
  centers = jnp.eye(3, 8)
  for name, expected in (
      ('supcon', losses.supervised_contrastive(z, labels, 0.1)),
      ('balanced_supcon', metric_losses.balanced_supervised_contrastive(z, labels, 0.1)),
      ('triplet', metric_losses.batch_hard_triplet(z, labels, 0.2))):
    value, new_centers = objectives.metric_loss(config(metric_loss=name))(z, labels, centers)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    assert new_centers is centers
  value, new_centers = objectives.metric_loss(config(metric_loss='class_center'))(z, labels, centers)
  np.testing.assert_allclose(float(value), float(metric_losses.class_center_triplet(
      z, labels, centers, 0.2)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_centers), np.asarray(
      metric_losses.update_centers(centers, z, labels, 0.9)), rtol=1e-6)


def test_two_views_and_class_centres_in_a_real_step():
  model = Stage1Net(encoder=make_encoder('resnet32', width=4, image_size=8), num_classes=3,
                    projection_dim=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  state = stages.stage1_state(variables, optax.sgd(0.1), jax.random.key(1), 3, 8)
  cfg = config(metric_loss='class_center', num_views=2, contrastive_weight=1.0, augment='crop',
               crop_padding=1)
  data_info = {'pixel_mean': [0.5], 'pixel_std': [0.25], 'counts': {'train': COUNTS}}
  step = jax.jit(functools.partial(
      stages.stage1_step_fn(cfg, model, data_info, 10, optax.constant_schedule(0.1)),
      pixel_mean=(0.5,), pixel_std=(0.25,)))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8),
           'label': np.asarray([0, 0, 1, 1, 2, 2], np.int32)}
  new_state, measurements = step(state, batch, jax.random.key(2))
  assert all(np.isfinite(float(v)) for v in measurements.values())
  # The centres moved towards the batch's class means, and stayed unit length.
  assert not np.allclose(np.asarray(new_state.centers), np.asarray(state.centers))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new_state.centers), axis=1), 1.0,
                             rtol=1e-5)
