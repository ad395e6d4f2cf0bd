"""imbal_jax.host_memory: freed XLA buffers stay mapped (counted in page faults), and the
settings apply only where they should."""

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from imbal_jax import host_memory

GLIBC = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'

# A jitted program whose 64 MiB output XLA allocates on its own thread, run 16 times;
# prints the page faults of each run. 64 MiB is above glibc's largest mmap threshold
# (32 MiB), like the buffers of a CPU train step.
FAULTS_PER_RUN = """
import json, resource, sys
from imbal_jax import host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == 'retain' else False
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones(16 * 2**20, jnp.float32)  # 64 MiB
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = double(x)
  y.block_until_ready()
  y.delete()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'retained': retained, 'faults': faults}))
"""
PAGES = 16 * 2**20 * 4 // 4096  # pages of one output (4 KiB pages)


def faults_per_run(mode):
  env = subprocess_env(1, cache=False)
  for name in ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.ENV_SWITCH):
    env.pop(name, None)  # the allocator as glibc sets it by default
  result = subprocess.run([sys.executable, '-c', FAULTS_PER_RUN, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not GLIBC or os.sysconf('SC_PAGE_SIZE') != 4096,
                    reason='glibc on Linux with 4 KiB pages')
def test_freed_buffers_are_reused_without_page_faults():
  retained, default = faults_per_run('retain'), faults_per_run('default')
  assert retained['retained'] is True and default['retained'] is False
  # glibc's default: each run maps a fresh output and faults in every page of it.
  assert min(default['faults']) >= 0.9 * PAGES, default
  # Retained: the heap grows for the first few runs (4 to 8 in 12 trials here), then
  # the runs reuse freed, already mapped memory, but for the odd run that grows it
  # once more.
  assert sum(retained['faults'][-8:]) <= 2.1 * PAGES, retained


@pytest.mark.skipif(not GLIBC, reason='glibc on Linux')
def test_nothing_changes_once_backends_started(monkeypatch):
  # The test process's backends are running (conftest): too late, so it does nothing.
  for name in ('GLIBC_TUNABLES', 'LD_PRELOAD', host_memory.ENV_SWITCH):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, '_jax_platforms', lambda: 'cpu')
  import jax
  jax.devices()
  assert host_memory.why_not() == "JAX's backends have already started"
  before = host_memory.retained()  # True if an earlier in-process command set it in time
  assert host_memory.retain_freed_memory() is False and host_memory.retained() is before


@pytest.mark.parametrize('env, platforms, plugin, expected', [
    ({host_memory.ENV_SWITCH: '0'}, 'cpu', False, 'IMBAL_JAX_RETAIN_HOST_MEMORY=0'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, 'cpu', False, 'GLIBC_TUNABLES'),
    ({'LD_PRELOAD': '/usr/lib/libjemalloc.so.2'}, 'cpu', False, 'LD_PRELOAD'),
    ({}, 'cuda', False, 'JAX_PLATFORMS=cuda'),
    ({}, 'cpu,tpu', False, 'JAX_PLATFORMS=cpu,tpu'),
    ({}, '', True, 'GPU or TPU plugin'),
    ({}, '', False, None),
    ({}, 'cpu', True, None),  # JAX_PLATFORMS=cpu: no accelerator will be used
])
def test_applies_only_to_cpu_runs_that_left_the_allocator_alone(monkeypatch, env, platforms,
                                                                plugin, expected):
  if not GLIBC:
    pytest.skip('glibc on Linux')
  for name in (host_memory.ENV_SWITCH, 'GLIBC_TUNABLES', 'LD_PRELOAD'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(host_memory, '_jax_platforms', lambda: platforms)
  monkeypatch.setattr(host_memory, 'accelerator_plugin_installed', lambda: plugin)
  monkeypatch.setattr(host_memory, '_backends_started', lambda: False)
  reason = host_memory.why_not()
  if expected is None:
    assert reason is None
  else:
    assert reason is not None and expected in reason, reason
