"""Step functions: global-batch semantics across devices, single trace, frozen encoder."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imbal_jax import sharding, steps
from imbal_jax.models import LinearHead, Stage1Net, encoder_variables, make_encoder

NUM_CLASSES = 5
BATCH = 32
PREPROCESS = dict(pixel_mean=(0.3,), pixel_std=(0.2,), augment='crop', crop_padding=1)


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, size=(BATCH, 8, 8, 1), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)}


@pytest.fixture(scope='module')
def stage1():
  model = Stage1Net(encoder=make_encoder('resnet32', width=4, image_size=8),
                    num_classes=NUM_CLASSES, projection_dim=8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  batch_stats=variables['batch_stats'], tx=tx)
  # Host copies: each test puts its own device buffers, which the steps may donate.
  return model, jax.device_get(state)


def on_mesh(tree, mesh):
  return jax.device_put(tree, sharding.replicated(mesh))


def test_stage1_loss_and_grads_same_on_8_devices_as_on_1(stage1, devices):
  model, state = stage1
  batch = make_batch(0)
  images = steps.preprocess(jnp.asarray(batch['image']), None, **PREPROCESS)
  results = []
  for mesh in (sharding.make_mesh(devices[:1]), sharding.make_mesh(devices)):
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(
        steps.stage1_loss, model=model, contrastive_weight=0.5, temperature=0.1), has_aux=True))
    data = sharding.put_global_batch({'image': np.asarray(images), 'label': batch['label']}, mesh)
    assert len(data['image'].sharding.device_set) == mesh.devices.size
    (loss, aux), grads = grad_fn(on_mesh(state.params, mesh), on_mesh(state.batch_stats, mesh),
                                 data['image'], data['label'])
    results.append((float(loss), float(aux['contrastive']), jax.device_get(grads),
                    jax.device_get(aux['batch_stats'])))
  (loss1, con1, grads1, stats1), (loss8, con8, grads8, stats8) = results
  assert con1 > 0
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(con8, con1, rtol=1e-5)
  chex.assert_trees_all_close(grads8, grads1, atol=1e-5, rtol=1e-5)
  # Batch norm statistics come from the global batch, not a per-device shard.
  chex.assert_trees_all_close(stats8, stats1, atol=1e-5, rtol=1e-5)


def test_stage1_step_on_8_devices_matches_1_device_and_compiles_once(stage1, devices):
  model, state = stage1
  chex.clear_trace_counter()
  step = chex.assert_max_traces(steps.stage1_step, n=1)
  kwargs = dict(model=model, contrastive_weight=0.5, temperature=0.1,
                learning_rate_fn=optax.constant_schedule(0.1), **PREPROCESS)
  final = []
  for mesh in (sharding.make_mesh(devices[:1]), sharding.make_mesh(devices)):
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    jitted = jax.jit(functools.partial(step, **kwargs), donate_argnums=0,
                     in_shardings=(repl, data, repl), out_shardings=(repl, repl))
    current = on_mesh(state, mesh)
    for seed in range(3):
      current, measurements = jitted(current, sharding.put_global_batch(make_batch(seed), mesh),
                                     jax.random.key(7))
      for name, value in measurements.items():
        assert np.isfinite(float(value)), name
    assert int(current.step) == 3
    final.append(jax.device_get(current.params))
    chex.clear_trace_counter()  # the second mesh is a new program, allowed one trace
  chex.assert_trees_all_close(final[1], final[0], atol=1e-4, rtol=1e-4)


def test_stage2_step_trains_only_the_head_and_leaves_encoder_bit_identical(stage1, devices):
  model, state = stage1
  mesh = sharding.make_mesh(devices)
  encoder = model.encoder
  frozen = on_mesh(encoder_variables(state.params, state.batch_stats), mesh)
  frozen_before = jax.tree.map(np.array, jax.device_get(frozen))
  head = LinearHead(NUM_CLASSES)
  head_params = head.init(jax.random.key(3), jnp.zeros((1, 16)))['params']
  head_state = on_mesh(steps.TrainState.create(apply_fn=head.apply, params=head_params,
                                               batch_stats={}, tx=optax.sgd(0.5)), mesh)
  head_before = jax.device_get(head_state.params)
  chex.clear_trace_counter()
  step = chex.assert_max_traces(steps.stage2_step, n=1)
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  jitted = jax.jit(functools.partial(step, encoder=encoder, head=head,
                                     learning_rate_fn=optax.constant_schedule(0.5), **PREPROCESS),
                   donate_argnums=0, in_shardings=(repl, data, repl, repl),
                   out_shardings=(repl, repl))
  for seed in range(3):
    head_state, measurements = jitted(head_state, sharding.put_global_batch(make_batch(seed), mesh),
                                      jax.random.key(seed), frozen)
    assert np.isfinite(float(measurements['loss']))
  assert set(head_state.params) == {'dense'}
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), head_before,
                         jax.device_get(head_state.params))
  assert all(jax.tree.leaves(changed))
  chex.assert_trees_all_equal(jax.device_get(frozen), frozen_before)


def test_evaluation_keeps_every_example_once_on_1_and_8_devices(stage1, devices):
  """Padded global batches: identical probabilities, in order, whatever the device count."""
  from imbal_jax import train
  from imbal_jax.data.sources import Split
  model, state = stage1
  rng = np.random.default_rng(1)
  split = Split(rng.integers(0, 256, size=(37, 8, 8, 1), dtype=np.uint8),
                rng.integers(0, NUM_CLASSES, size=37).astype(np.int32))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  step = functools.partial(steps.eval_step, logits_fn=functools.partial(steps.stage1_logits,
                                                                        model=model),
                           pixel_mean=(0.3,), pixel_std=(0.2,))
  results = []
  for mesh, batch_size in ((sharding.make_mesh(devices[:1]), 5),
                           (sharding.make_mesh(devices), 16)):
    eval_fn = jax.jit(step, out_shardings=sharding.replicated(mesh))
    results.append(train.evaluate(eval_fn, on_mesh(variables, mesh), split, batch_size, mesh))
  assert results[0].shape == results[1].shape == (37, NUM_CLASSES)
  np.testing.assert_allclose(results[0], results[1], atol=1e-5)
  expected = jax.nn.softmax(steps.stage1_logits(
      variables, steps.preprocess(jnp.asarray(split.images), None, **PREPROCESS), model=model))
  np.testing.assert_allclose(results[0], np.asarray(expected), atol=1e-5)


def test_batch_size_must_divide_device_count(devices):
  with pytest.raises(ValueError, match=r'config.batch_size=12 .* 8 devices.*try 8 or 16'):
    sharding.check_batch_size(12, sharding.make_mesh(devices))


def test_a_skipped_update_keeps_the_schedule_at_the_step():
  # Plain SGD on a cosine schedule, so each update is -lr * gradient: a refused
  # (non-finite) update changes no parameter and no momentum, but the learning rate
  # of every later step is still the schedule's value at that step, the one logged.
  import ml_collections
  from imbal_jax import stages
  config = ml_collections.ConfigDict(dict(num_epochs=1, warmup_epochs=0, learning_rate=1.0,
                                          momentum=0.9, weight_decay=0.0))
  tx, learning_rate_fn = stages.make_optimizer(config, 10)
  state = steps.TrainState.create(apply_fn=None, params={'w': jnp.zeros(())}, tx=tx,
                                  batch_stats={})
  applied = []
  for step in range(5):
    grads = {'w': jnp.asarray(jnp.nan if step == 1 else 1.0)}
    new = steps.guarded_update(state, state.apply_gradients(grads=grads), jnp.zeros(()), grads)
    applied.append(float(state.params['w'] - new.params['w']))
    if step == 1:  # refused: the momentum trace is the one before it, the count moved on
      def leaves(tree, counts):
        return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                if (getattr(path[-1], 'name', None) == 'count') == counts]
      chex.assert_trees_all_equal(leaves(new.opt_state, False), leaves(state.opt_state, False))
      assert [int(c) for c in leaves(new.opt_state, True)] == [2]
    state = new
  assert int(state.step) == 5 and int(state.nonfinite_steps) == 1
  # Momentum 0.9: the trace is 1 after step 0, then 1.9, 2.71, ... skipping step 1.
  traces = [1.0, None, 1.9, 2.71, 3.439]
  for step, trace in enumerate(traces):
    expected = 0.0 if trace is None else float(learning_rate_fn(step)) * trace
    assert applied[step] == pytest.approx(expected, rel=1e-5), step
