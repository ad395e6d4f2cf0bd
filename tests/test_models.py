"""Model shapes and sizes against the published parameter counts."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imbal_jax.models import Stage1Net, make_encoder, resnet


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


def test_relu_add_is_relu_of_the_sum_in_value_and_gradient():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 6, 6, 8)).astype(np.float32)
  b = rng.normal(size=a.shape).astype(np.float32)
  # Ties and zeros, where max(a, -b) + b and relu(a + b) could part ways.
  a[0, 0, 0, :4] = -b[0, 0, 0, :4]
  a[0, 0, 1, :2] = 0.0
  b[0, 0, 1, :2] = 0.0
  out = np.asarray(resnet.relu_add(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_array_equal(out, np.maximum(a + b, 0.0))
  upstream = rng.normal(size=a.shape).astype(np.float32)
  grad_a, grad_b = jax.grad(
      lambda a, b: jnp.sum(resnet.relu_add(a, b) * upstream), argnums=(0, 1))(a, b)
  expected = np.where(a + b > 0, upstream, 0.0)
  np.testing.assert_array_equal(np.asarray(grad_a), expected)
  np.testing.assert_array_equal(np.asarray(grad_b), expected)


def _largest_fused_relu_chain(model, images):
  """The most relus (`maximum` ops) inside one fusion of the compiled training gradient."""
  # XLA's CPU fusion is what this is about: compile for the CPU whatever the default backend.
  cpu = jax.devices('cpu')[0]
  images = jax.device_put(images, cpu)
  variables = jax.device_put(model.init(jax.random.key(0), images), cpu)

  def loss(params):
    features, _ = model.apply({**variables, 'params': params}, images, mutable=['batch_stats'])
    return jnp.sum(features ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(variables['params']).compile().as_text()
  bodies = re.split(r'\n(?=%?fused_computation)', hlo)
  # No fused computations found gives 0, which the counter-check below rejects.
  return max((body.count(' maximum(') for body in bodies if body.startswith(('%fused', 'fused'))),
             default=0)


class _BottleneckStack(nn.Module):
  """Five bottleneck blocks of one stage, as in resnet50 (a stage of its own, to compile fast)."""

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME')
    norm = functools.partial(resnet.BatchNorm, use_running_average=False)
    x = conv(16, (3, 3))(x)
    for _ in range(5):
      x = resnet.BottleneckBlock(4, 1, conv=conv, norm=norm)(x)
    return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
def test_no_fusion_recomputes_the_residual_stream(monkeypatch, block):
  """Each block's output is computed once: no fusion holds the relus of earlier blocks.

  XLA's CPU fusion recomputed the whole residual stream of a stage inside every
  fusion reading a block's output while blocks ended on relu(a + b); removing
  that made a resnet32 step 36% faster on CPU (docs/performance.md). The
  counter-check puts relu(a + b) back and sees the chain, so the check can fail.
  """
  if block == 'basic':
    model = make_encoder('resnet32', width=4, image_size=8)  # 3 stages of 5 blocks
  else:
    model = _BottleneckStack()
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  kept = _largest_fused_relu_chain(model, images)
  assert kept <= 2, kept  # jax 0.10.2: 2 (basic), 1 (bottleneck)
  monkeypatch.setattr(resnet, 'relu_add', lambda a, b: nn.relu(a + b))
  recomputed = _largest_fused_relu_chain(model, images)
  # jax 0.10.2: 6 (basic: a 5-block stage and the stem), 4 (bottleneck).
  assert recomputed >= 4, recomputed
