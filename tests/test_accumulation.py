"""Gradient accumulation (gradient cache): the large-batch update from micro-batches."""

import functools
import importlib.util
import json
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import ROOT
from imbal_jax import configuration, objectives, sharding, stages, steps
from imbal_jax.models import Stage1Net, make_encoder

NUM_CLASSES = 5
BATCH = 32
PREPROCESS = dict(pixel_mean=(0.3,), pixel_std=(0.2,), augment='crop', crop_padding=1)


def load_config(name, **overrides):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('digits_lt')
  config.update(overrides)
  return config


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, size=(BATCH, 8, 8, 1), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)}


class TinyEncoder(nn.Module):
  """Two convolutions and a pool, no batch norm: accumulation must then be exact."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize('metric_loss,num_views', [('supcon', 1), ('class_center', 2)])
def test_accumulated_update_equals_the_full_batch_update_without_batch_norm(
    devices, metric_loss, num_views):
  mesh = sharding.make_mesh(devices)
  model = Stage1Net(encoder=TinyEncoder(), num_classes=NUM_CLASSES, projection_dim=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  centers = jax.random.normal(jax.random.key(1), (NUM_CLASSES, 8))
  # Host copies: each step gets its own device buffers to donate.
  state = jax.device_get(steps.TrainState.create(
      apply_fn=None, params=variables['params'], batch_stats={},
      centers=centers / jnp.linalg.norm(centers, axis=1, keepdims=True),
      tx=optax.sgd(0.5, momentum=0.9)))
  loss_config = ml_collections.ConfigDict(dict(metric_loss=metric_loss, temperature=0.1,
                                                margin=0.2, center_momentum=0.5))
  batch = sharding.put_global_batch(make_batch(0), mesh)
  results = []
  for grad_accum_steps in (1, 4):
    step = stages.jit_train_step(functools.partial(
        steps.stage1_step, model=model, contrastive_weight=0.5,
        learning_rate_fn=optax.constant_schedule(0.5), num_views=num_views,
        metric_loss=objectives.metric_loss(loss_config), grad_accum_steps=grad_accum_steps,
        **PREPROCESS), mesh)
    new_state, measurements = step(sharding.put_replicated(state, mesh), batch, jax.random.key(2))
    results.append(jax.device_get((new_state.params, new_state.centers, measurements)))
  (params1, centers1, measured1), (params4, centers4, measured4) = results
  assert measured1['contrastive'] > 0
  for name in ('loss', 'ce', 'contrastive', 'grad_norm', 'train_accuracy'):
    np.testing.assert_allclose(measured4[name], measured1[name], rtol=1e-5, err_msg=name)
  chex.assert_trees_all_close(params4, params1, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(centers4, centers1, atol=1e-5, rtol=1e-5)
  # The update did something for the comparison to mean anything.
  assert not np.allclose(params1['encoder']['Conv_0']['kernel'],
                         variables['params']['encoder']['Conv_0']['kernel'])
  if metric_loss == 'class_center':
    assert not np.allclose(centers1, state.centers)


def stem_statistics(images, kernel):
  """Per-image outputs of the stem's 3x3 SAME convolution, in NumPy: [batch, h, w, out]."""
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = images.shape[1:3]
  return sum(np.einsum('bhwc,co->bhwo', padded[:, dy:dy + height, dx:dx + width], kernel[dy, dx])
             for dy in range(3) for dx in range(3))


DATA_INFO = {'pixel_mean': [0.3], 'pixel_std': [0.2], 'counts': {'train': [20] * NUM_CLASSES}}


def resnet_step_fn(**overrides):
  """(host initial state, bound stage-1 step) of a width-4 ResNet-32 on 8x8 images,
  2 micro-batches per step: train.py's step function, not yet jitted."""
  config = configuration.resolve(load_config('stage1', width=4, projection_dim=8,
                                             batch_size=BATCH, grad_accum_steps=2,
                                             augment='none', **overrides))
  model = Stage1Net(encoder=make_encoder('resnet32', 4, 8), num_classes=NUM_CLASSES,
                    projection_dim=8)
  tx, learning_rate_fn = stages.make_optimizer(config, steps_per_epoch=10)

  @jax.jit
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, 8, 8, 1)), train=False)
    return stages.stage1_state(variables, tx, jax.random.fold_in(rng, 1), NUM_CLASSES, 8)

  return (jax.device_get(init(jax.random.key(0))),
          stages.stage1_step_fn(config, model, DATA_INFO, 10, learning_rate_fn))


def test_resnet_accumulation_compiles_once_and_averages_batch_norm_statistics(devices):
  """Real ResNet-32 with batch norm, 2 micro-batches over 8 devices.

  Batch norm normalises each micro-batch by its own statistics; the running
  statistics take one momentum update with the micro-batches' mean and
  variance averaged. Checked on the stem, whose input does not depend on batch
  norm, against NumPy: the mean is the full batch's, the variance the average
  of the micro-batch variances (below the full batch's by the spread of the
  micro-batch means).
  """
  mesh = sharding.make_mesh(devices)
  state, bound = resnet_step_fn()
  assert bound.keywords['grad_accum_steps'] == 2
  chex.clear_trace_counter()
  counted = functools.partial(chex.assert_max_traces(bound.func, n=1), *bound.args,
                              **bound.keywords)
  step = stages.jit_train_step(counted, mesh, pixel_stats=stages.pixel_stats(DATA_INFO))
  current = sharding.put_replicated(state, mesh)
  for seed in range(2):
    current, measurements = step(current, sharding.put_global_batch(make_batch(seed), mesh),
                                 jax.random.key(2))
    for name, value in measurements.items():
      assert np.isfinite(float(value)), name
    if seed == 0:
      stem = jax.device_get(current.batch_stats['encoder']['BatchNorm_0'])
  assert int(current.step) == 2 and int(current.nonfinite_steps) == 0

  images = (make_batch(0)['image'] / 255.0 - 0.3) / 0.2
  outputs = stem_statistics(images, np.asarray(state.params['encoder']['Conv_0']['kernel']))
  micro_batches = [outputs[0::2], outputs[1::2]]  # rows j, j + 2, ...: micro-batch j
  micro_var = np.mean([m.var(axis=(0, 1, 2)) for m in micro_batches], axis=0)
  full_var = outputs.var(axis=(0, 1, 2))
  momentum = 0.9  # from an initial mean 0, variance 1
  np.testing.assert_allclose(stem['mean'], (1 - momentum) * outputs.mean(axis=(0, 1, 2)),
                             atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(stem['var'], momentum + (1 - momentum) * micro_var, rtol=1e-5)
  assert np.all(micro_var <= full_var) and not np.allclose(micro_var, full_var, rtol=1e-4)


@pytest.mark.parametrize('overrides,message', [
    ({'grad_accum_steps': 0}, r'config\.grad_accum_steps=0 must be >= 1'),
    # 8 devices x 4 micro-batches = 32 does not divide 48.
    ({'grad_accum_steps': 4, 'batch_size': 48},
     r'config\.batch_size=48 must be divisible by config\.grad_accum_steps=4 .*8 devices'),
])
def test_invalid_accumulation_is_a_config_error(overrides, message):
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.resolve(load_config('stage1', **overrides))


def test_stage2_refuses_accumulation(tmp_path):
  stage1_dir = tmp_path / 'stage1'
  (stage1_dir / 'best' / '10').mkdir(parents=True)
  (stage1_dir / 'report.json').write_text('{}')  # finished
  (stage1_dir / 'config.json').write_text(json.dumps(load_config('stage1').to_dict()))
  config = load_config('stage2', init_from=str(stage1_dir), grad_accum_steps=2)
  with pytest.raises(configuration.ConfigError, match=r'config\.grad_accum_steps=2: .* stage 1'):
    configuration.resolve(config)


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$')
CALLED = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations)=\{?([^,}]+(?:, %[^,}]+)*)')


def computations(hlo_text):
  """{name: [(instruction, opcode, rest of line)]} of an HLO module's text, and the entry's name."""
  found, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(ENTRY )?%([\w.\-]+) .*\{$', line)
    if header:
      current = found.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif current is not None and (match := INSTRUCTION.match(line)):
      current.append(match.groups())
  return found, entry


def unordered_collectives(hlo_text):
  """In an optimised HLO module: the entry's loops whose body reduces across
  devices, its top-level collectives, and the (collective, loop) pairs of which
  neither depends on the other, so that a device may run them in either order."""
  found, entry = computations(hlo_text)

  def has_collective(name, seen=()):
    for _, opcode, rest in found.get(name, []):
      if opcode.removesuffix('-start') in COLLECTIVES:
        return True
      for called in CALLED.findall(rest):
        for callee in re.findall(r'%?([\w.\-]+)', called):
          if callee not in seen and has_collective(callee, seen + (name,)):
            return True
    return False

  instructions = {name: rest for name, _, rest in found[entry]}
  operands = {name: set(re.findall(r'%([\w.\-]+)', rest)) & instructions.keys()
              for name, rest in instructions.items()}

  def ancestors(name):
    seen, todo = set(), [name]
    while todo:
      for operand in operands[todo.pop()] - seen:
        seen.add(operand)
        todo.append(operand)
    return seen

  loops = [name for name, opcode, rest in found[entry] if opcode == 'while'
           and any(has_collective(callee) for callee in re.findall(r'body=%([\w.\-]+)', rest))]
  collectives = [name for name, opcode, _ in found[entry]
                 if opcode.removesuffix('-start') in COLLECTIVES]
  unordered = [(collective, loop) for loop in loops for collective in collectives
               if loop not in ancestors(collective) and collective not in ancestors(loop)]
  return loops, collectives, unordered


def compiled_accumulating_step(devices, **overrides):
  """The optimised HLO text of `resnet_step_fn`'s step, jitted for the 8 devices."""
  mesh = sharding.make_mesh(devices)
  state, step_fn = resnet_step_fn(**overrides)
  step = stages.jit_train_step(step_fn, mesh, pixel_stats=stages.pixel_stats(DATA_INFO))
  return step.fn.lower(sharding.put_replicated(state, mesh),
                       sharding.put_global_batch(make_batch(0), mesh),
                       jax.random.key(2), *step.trailing).compile().as_text()


@pytest.mark.parametrize('overrides', [
    {},  # CE + SupCon, the test_resnet_accumulation step
    {'loss': 'ldam_drw', 'metric_loss': 'class_center', 'num_views': 2},
])
def test_accumulation_leaves_no_reduction_unordered_against_a_loop(devices, overrides):
  """Regression test for a deadlock of the accumulating step on XLA:CPU
  (`steps._tied`): a top-level cross-device reduction that neither depends on a
  loop that reduces inside nor feeds it ran in a different order against the
  loop on different devices, and each waited for the rest."""
  loops, collectives, unordered = unordered_collectives(
      compiled_accumulating_step(devices, **overrides))
  assert len(loops) == 2, 'expected the two micro-batch loops, each reducing batch norm'
  assert collectives, 'expected cross-device reductions outside the loops'
  assert not unordered, f'collectives that may run in either order with a loop: {unordered}'


def test_the_order_check_finds_the_pairs_of_an_untied_step(devices, monkeypatch):
  """Without `steps._tied`, the same step has unordered pairs (jax 0.10.2): the
  check above can see them."""
  monkeypatch.setattr(steps, '_tied', lambda values: values)
  loops, _, unordered = unordered_collectives(compiled_accumulating_step(devices))
  assert len(loops) == 2 and unordered
