"""Mixed precision: bfloat16 compute, float32 parameters, statistics and losses."""

import functools
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from imbal_jax import configuration, sharding, stages, steps
from imbal_jax.models import Stage1Net, make_encoder, resnet

NUM_CLASSES = 5
BATCH = 32
DATA_INFO = {'pixel_mean': [0.3], 'pixel_std': [0.2], 'counts': {'train': [20] * NUM_CLASSES}}


def stage1_config(**overrides):
  spec = importlib.util.spec_from_file_location('cfg_stage1', ROOT / 'configs' / 'stage1.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('digits_lt')
  config.update(width=4, projection_dim=8, batch_size=BATCH, **overrides)
  return config


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, size=(BATCH, 8, 8, 1), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)}


def floating_dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def test_batch_norm_in_bfloat16_reduces_and_normalises_in_float32():
  # An offset of 10 makes E[x^2] - E[x]^2 cancel: in bfloat16 (8-bit mantissa) the
  # variance would be lost entirely; in float32 it keeps ~5 digits.
  rng = np.random.default_rng(0)
  x = jnp.asarray(10 + rng.normal(size=(64, 4, 4, 3)), jnp.bfloat16)
  reference = np.asarray(x, np.float64)
  mean, var = reference.mean(axis=(0, 1, 2)), reference.var(axis=(0, 1, 2))
  norm = resnet.BatchNorm(use_running_average=False, momentum=0.0, dtype=jnp.bfloat16)
  variables = norm.init(jax.random.key(0), x)
  y, updates = jax.jit(lambda v, x: norm.apply(v, x, mutable=['batch_stats']))(variables, x)
  stats = updates['batch_stats']
  assert floating_dtypes(variables) == {jnp.dtype(jnp.float32)}
  assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-4)
  # Only the output is bfloat16: within its rounding (2^-9 relative, |y| < 4) of the exact value.
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64), (reference - mean) / np.sqrt(var + 1e-5),
                             atol=2e-2)


@pytest.fixture(scope='module')
def bfloat16_stage(devices):
  config = configuration.resolve(stage1_config(dtype='bfloat16'))
  dataset = types.SimpleNamespace(image_shape=(8, 8, 1), num_classes=NUM_CLASSES)
  mesh = sharding.make_mesh(devices)
  return config, mesh, stages.build_stage1(config, dataset, DATA_INFO, mesh, steps_per_epoch=10)


def test_build_stage1_computes_convolutions_and_dense_layers_in_bfloat16(bfloat16_stage):
  _, _, stage = bfloat16_stage
  model = stage.logits_fn.keywords['model']
  variables = stage.eval_variables(stage.state)
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, jnp.zeros((2, 8, 8, 1)))
  operand_dtypes = {'conv_general_dilated': [], 'dot_general': []}
  for equation in jaxpr.jaxpr.eqns:
    if equation.primitive.name in operand_dtypes:
      dtypes = {v.aval.dtype for v in equation.invars}
      assert len(dtypes) == 1, equation
      operand_dtypes[equation.primitive.name].append(dtypes.pop().name)
  # The 31 convolutions of ResNet-32 and the projection's hidden layer in bfloat16; the
  # layers that make the logits and the embeddings in float32.
  assert operand_dtypes['conv_general_dilated'] == ['bfloat16'] * 31
  assert sorted(operand_dtypes['dot_general']) == ['bfloat16', 'float32', 'float32']
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  logits, embeddings = model.apply(variables, images, train=False)
  assert logits.dtype == embeddings.dtype == jnp.float32
  # Float32 values, not bfloat16 ones cast up.
  for values in (logits, embeddings):
    assert np.any(np.asarray(values) != np.asarray(values.astype(jnp.bfloat16), np.float32))


def test_bfloat16_loss_is_within_1e_2_of_float32_on_the_same_params(bfloat16_stage):
  config, _, stage = bfloat16_stage
  state = jax.device_get(stage.state)
  batch = make_batch(0)
  images = steps.preprocess(jnp.asarray(batch['image']), None, pixel_mean=(0.3,),
                            pixel_std=(0.2,), augment='none', crop_padding=0)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    model = Stage1Net(encoder=make_encoder('resnet32', 4, 8, dtype), num_classes=NUM_CLASSES,
                      projection_dim=config.projection_dim, dtype=jnp.dtype(dtype))
    loss_fn = jax.jit(functools.partial(
        steps.stage1_loss, model=model, contrastive_weight=config.contrastive_weight,
        temperature=config.temperature))
    loss, aux = loss_fn(state.params, state.batch_stats, images, batch['label'])
    assert loss.dtype == aux['ce'].dtype == aux['contrastive'].dtype == jnp.float32
    results[dtype] = (float(loss), float(aux['ce']), float(aux['contrastive']))
  assert np.all(np.isfinite(results['bfloat16']))
  # CE + 0.5 SupCon and each term separately.
  np.testing.assert_allclose(results['bfloat16'], results['float32'], rtol=1e-2)


def test_bfloat16_steps_stay_finite_and_keep_float32_state(bfloat16_stage):
  _, mesh, stage = bfloat16_stage
  # A copy: the step donates its input state, and the fixture's serves every test.
  state = sharding.put_replicated(jax.device_get(stage.state), mesh)
  params_before = jax.device_get(state.params)
  for seed in range(3):
    state, measurements = stage.train_step(state, sharding.put_global_batch(make_batch(seed), mesh),
                                           jax.random.key(1))
    for name, value in measurements.items():
      assert np.isfinite(float(value)), name
  assert int(state.step) == 3 and int(state.nonfinite_steps) == 0
  float32 = {jnp.dtype(jnp.float32)}
  for part in (state.params, state.opt_state, state.batch_stats, state.centers):
    assert floating_dtypes(part) == float32
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params_before,
                       jax.device_get(state.params))
  assert any(jax.tree.leaves(moved))


def test_unknown_dtype_is_a_config_error():
  with pytest.raises(configuration.ConfigError, match=r"config\.dtype='float16' is not known"):
    configuration.resolve(stage1_config(dtype='float16'))
