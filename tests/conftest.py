"""Test set-up: 8 forced CPU devices and JAX's persistent compilation cache.

Both must be configured before JAX initialises its backends, hence at import.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = pathlib.Path(os.environ.get('IMBAL_JAX_TEST_CACHE', ROOT / '.cache' / 'jax-tests'))
NUM_DEVICES = 8

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={NUM_DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_COMPILATION_CACHE_DIR'] = str(CACHE_DIR)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', str(CACHE_DIR))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


@pytest.fixture(scope='session')
def devices():
  found = jax.devices()
  assert len(found) == NUM_DEVICES, f'expected {NUM_DEVICES} forced CPU devices, got {found}'
  return found
