"""Defaults of the CPU commands: one JAX CPU device per core (distributed.use_cpu_cores)
and, in an experiment, a compilation cache in its workdir."""

import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, TEST_XLA_FLAGS
from imbal_jax import distributed, sharding, stages


def slow_device_count(batch_sizes, cores):
  """The obvious reference: try every count from `cores` down."""
  for count in range(cores, 0, -1):
    if all(size % count == 0 for size in batch_sizes):
      return count
  raise AssertionError('1 divides every batch')


@pytest.mark.parametrize('batch_sizes, cores, expected', [
    ([128, 256], 2, 2),
    ([128, 256], 16, 16),
    ([64, 96], 12, 8),  # gcd 32: 8 is its largest divisor up to 12
    ([6], 4, 3),
    ([7], 4, 1),
    ([128, 256, 32], 64, 32),
    ([5], 1, 1),
])
def test_cpu_device_count_is_the_largest_count_dividing_every_batch(batch_sizes, cores,
                                                                    expected):
  assert distributed.cpu_device_count(batch_sizes, cores) == expected
  assert expected == slow_device_count(batch_sizes, cores)


def test_cpu_device_count_defaults_to_the_cores_this_process_may_use():
  cores = len(os.sched_getaffinity(0))
  assert distributed.cpu_device_count([2 ** 10 * 3 ** 5 * 5 ** 3 * 7 ** 2]) == \
      slow_device_count([2 ** 10 * 3 ** 5 * 5 ** 3 * 7 ** 2], cores)


def test_config_batch_sizes_include_micro_batches_and_the_eval_batch():
  config = ml_collections.ConfigDict({'batch_size': 128, 'eval_batch_size': 200,
                                      'grad_accum_steps': 4})
  assert distributed.config_batch_sizes(config) == [128, 200, 32]
  config.grad_accum_steps = 1
  assert distributed.config_batch_sizes(config) == [128, 200]
  assert distributed.cpu_device_count(distributed.config_batch_sizes(config), 16) == 8


PROBE = """
import jax
from imbal_jax import distributed
{before}
chosen = distributed.use_cpu_cores([6], cores=4)
print(chosen, jax.device_count(), jax.default_backend())
"""


def probe(env_changes, before=''):
  # XLA's convolutions: with oneDNN's, a CPU command takes one device (test_cpu_conv.py).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=TEST_XLA_FLAGS,
             IMBAL_JAX_CPU_CONV='xla')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env.update(env_changes)
  result = subprocess.run([sys.executable, '-c', PROBE.format(before=before)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout.split()


def test_a_cpu_run_gets_one_device_per_core_dividing_the_batch():
  assert probe({}) == ['3', '3', 'cpu']


@pytest.mark.parametrize('env_changes, devices', [
    ({'JAX_NUM_CPU_DEVICES': '1'}, '1'),
    ({'XLA_FLAGS': f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2'}, '2'),
])
def test_a_device_count_the_user_chose_is_kept(env_changes, devices):
  assert probe(env_changes) == ['None', devices, 'cpu']


def test_backends_already_started_keep_their_devices():
  assert probe({}, before='jax.devices()') == ['None', '1', 'cpu']


CACHE_PROBE = """
import pathlib, jax
from imbal_jax import experiment
experiment.keep_compiled_programs(pathlib.Path({workdir!r}))
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize('configured', [False, True])
def test_an_experiment_keeps_compiled_programs_in_its_workdir(tmp_path, configured):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=TEST_XLA_FLAGS)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  if configured:
    env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'mine')
  result = subprocess.run([sys.executable, '-c', CACHE_PROBE.format(workdir=str(tmp_path))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  expected = tmp_path / ('mine' if configured else 'jax_cache')
  assert result.stdout.split() == [str(expected)]


def _conv_step(state, batch, rng):
  """A train-step-shaped function (state, batch, rng) -> (state, measurements) with a convolution."""
  del rng
  images = batch['image'].astype(jnp.float32)

  def loss(kernel):
    out = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.mean(out ** 2)

  value, grad = jax.value_and_grad(loss)(state)
  return state - 0.1 * grad, {'loss': value}


def ynnpack_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of a compiled program's text hold a convolution."""
  # A computation's header is one line ending in '{'; its body ends at a line '}'.
  bodies = dict(re.findall(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.MULTILINE | re.DOTALL))
  called = re.findall(r'^\s+%ynn_fusion\S* = .*?calls=%([\w.\-]+)', hlo, re.MULTILINE)
  assert set(called) <= set(bodies), set(called) - set(bodies)  # none missed by the parse
  return sum(' convolution(' in bodies[name] for name in called)


def test_cpu_programs_run_convolutions_outside_ynnpack(devices):
  mesh = sharding.make_mesh(devices)
  assert sharding.compiler_options(mesh) == sharding.CPU_COMPILER_OPTIONS
  state = sharding.put_replicated(jnp.ones((3, 3, 32, 32)), mesh)
  batch = sharding.put_global_batch(
      {'image': np.ones((len(devices) * 8, 8, 8, 32), np.uint8)}, mesh)
  rng = sharding.put_replicated(jax.random.key(0), mesh)
  step = stages.jit_train_step(_conv_step, mesh)
  hlo = step.lower(state, batch, rng).compile().as_text()
  assert ' convolution(' in hlo and ynnpack_convolutions(hlo) == 0
  # Counter-check: with XLA's defaults YNNPACK does take a convolution of this
  # step, so the option still changes something (drop it when not).
  plain = jax.jit(_conv_step).lower(state, batch, rng).compile().as_text()
  assert ynnpack_convolutions(plain) > 0


def test_compiler_options_are_for_cpu_only_and_skip_what_xla_refuses(devices, monkeypatch, caplog):
  gpu_mesh = types.SimpleNamespace(devices=np.asarray([types.SimpleNamespace(platform='gpu')]))
  assert sharding.compiler_options(gpu_mesh) == {}
  monkeypatch.setattr(sharding, 'CPU_COMPILER_OPTIONS', {'xla_cpu_no_such_option': True})
  assert sharding.compiler_options(sharding.make_mesh(devices)) == {}
  assert 'xla_cpu_no_such_option' in caplog.text
