"""Model shapes and sizes against the published parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imbal_jax.models import Stage1Net, make_encoder


def count_params(encoder, image_size, channels=3):
  images = jnp.zeros((1, image_size, image_size, channels))
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), images, train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name,image_size,expected', [
    # He et al. (2016), table 6: ResNet-32 for CIFAR has 0.46M parameters.
    ('resnet32', 32, 0.46e6),
    # torchvision's resnet18 / resnet50 without the 1000-way fc layer:
    # 11,689,512 - 513,000 and 25,557,032 - 2,049,000.
    ('resnet18', 224, 11_176_512),
    ('resnet50', 224, 23_508_032),
])
def test_parameter_counts_match_published_architectures(name, image_size, expected):
  got = count_params(make_encoder(name, image_size=image_size), image_size)
  assert got == pytest.approx(expected, rel=0.01)


def test_small_images_use_the_small_stem():
  assert make_encoder('resnet18', image_size=28).small_stem
  assert not make_encoder('resnet18', image_size=224).small_stem
  assert make_encoder('resnet32', image_size=224).small_stem


def test_unknown_model_names_the_field():
  with pytest.raises(ValueError, match='config.model'):
    make_encoder('vgg16')


def test_stage1_net_outputs_logits_and_unit_embeddings():
  model = Stage1Net(encoder=make_encoder('resnet32', width=4, image_size=8), num_classes=7,
                    projection_dim=16)
  images = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  assert set(variables['params']) == {'encoder', 'classifier', 'projection'}
  assert set(variables['batch_stats']) == {'encoder'}
  logits, embeddings = model.apply(variables, images, train=False)
  assert logits.shape == (5, 7) and embeddings.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(embeddings), axis=1), 1.0, rtol=1e-5)


def test_probe_classifier_trains_the_classifier_but_not_the_encoder():
  encoder = make_encoder('resnet32', width=4, image_size=8)
  images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  labels = jnp.arange(6) % 3
  grads = {}
  for probe in (False, True):
    model = Stage1Net(encoder=encoder, num_classes=3, projection_dim=8, probe_classifier=probe)
    variables = model.init(jax.random.key(0), images, train=False)

    def ce(params):
      logits, _ = model.apply({**variables, 'params': params}, images, train=False)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), labels])

    grads[probe] = jax.grad(ce)(variables['params'])
  encoder_norm = lambda g: sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g['encoder']))
  assert encoder_norm(grads[False]) > 0 and encoder_norm(grads[True]) == 0
  jax.tree.map(np.testing.assert_array_equal, grads[True]['classifier'],
               grads[False]['classifier'])
