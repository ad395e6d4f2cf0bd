"""Test set-up: 8 forced CPU devices, XLA's cheapest CPU code generation and JAX's
persistent compilation cache.

All must be configured before JAX initialises its backends, hence at import.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = pathlib.Path(os.environ.get('IMBAL_JAX_TEST_CACHE', ROOT / '.cache' / 'jax-tests'))
NUM_DEVICES = 8
# The suite compiles a few hundred small programs and runs each for a few steps, so
# compiling dominates its time. Without LLVM's optimisations a tiny two-stage run
# compiles in about half the time (measured: 37 s instead of 57 s from a cold cache)
# and runs at about half the speed; results agree within float rounding.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {TEST_XLA_FLAGS}'
                           f' --xla_force_host_platform_device_count={NUM_DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_COMPILATION_CACHE_DIR'] = str(CACHE_DIR)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from imbal_jax import sharding  # noqa: E402

jax.config.update('jax_compilation_cache_dir', str(CACHE_DIR))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


# `make test` hands whole files to its three pytest-xdist workers (--dist loadfile, so a
# module's fixtures run once) in collection order (--no-loadscope-reorder): each
# worker starts with two files and takes the next when one is done. Slowest first,
# so that the workers finish at about the same time.
SLOW_FILES_FIRST = ('test_experiment.py', 'test_real_data_fashion.py', 'test_reliability.py',
                    'test_real_data.py', 'test_end_to_end.py', 'test_sources_end_to_end.py',
                    'test_predict.py', 'test_multiprocess.py', 'test_steps.py', 'test_benchmark.py',
                    'test_accumulation.py', 'test_precision.py', 'test_stage2_methods.py')


def pytest_collection_modifyitems(config, items):
  rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def mesh_over_first(monkeypatch, count):
  """train_and_evaluate's mesh over the first `count` of the 8 test devices."""
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: make_mesh(
      jax.devices()[:count] if devices is None else devices))


@pytest.fixture(scope='session')
def devices():
  if jax.default_backend() != 'cpu':  # e.g. JAX_PLATFORMS=cuda,cpu, to run the rest on a GPU
    pytest.skip(f'needs the {NUM_DEVICES} forced CPU devices as the default backend, '
                f'not {jax.default_backend()}')
  found = jax.devices()
  assert len(found) == NUM_DEVICES, f'expected {NUM_DEVICES} forced CPU devices, got {found}'
  return found


def subprocess_env(num_devices: int, cache: bool = True) -> dict[str, str]:
  """The environment of an imbal_jax command run by a test: `num_devices` forced CPU
  devices, the suite's XLA flags and (with `cache`) its compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={num_devices}')
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  else:
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
    env.pop('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', None)
  return env
