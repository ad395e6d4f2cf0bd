"""imbal_jax.host_memory: freed large blocks stay mapped (counted in page faults), and the
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

# 64 MiB blocks malloc'ed, filled and freed 8 times by a thread started after the
# settings, as XLA's threads are; prints the page faults of each. 64 MiB is above
# glibc's largest mmap threshold (32 MiB), like XLA's temporary buffer of a CPU train
# step (274 MB) and Eigen's convolution buffers (38 MB). (XLA frees its buffers on
# its own threads, a little later, so a jitted program would give a noisier count.)
FAULTS_PER_RUN = """
import ctypes, json, resource, sys, threading
from imbal_jax import host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == 'retain' else False
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 * 2**20
faults = []
def work():
  for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({'retained': retained, 'faults': faults}))
"""
PAGES = 64 * 2**20 // 4096  # pages of one block (4 KiB pages)


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
  # glibc's default: each block is a fresh mapping, every page of it faulted in.
  assert min(default['faults']) >= 0.9 * PAGES, default
  # Retained: the first block grows the heap; the others reuse it, already mapped.
  assert retained['faults'][0] >= 0.9 * PAGES, retained
  assert max(retained['faults'][1:]) < 0.05 * PAGES, retained


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


def test_an_accelerator_plugin_or_libtpu_counts_as_one(monkeypatch):
  import importlib.metadata
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'libtpu' else find_spec(name, *args))
  monkeypatch.setitem(sys.modules, 'jax_plugins', None)  # `import jax_plugins` fails
  assert host_memory.accelerator_plugin_installed() is False
  monkeypatch.setattr(importlib.metadata, 'entry_points',
                      lambda group: ['cuda'] if group == 'jax_plugins' else [])
  assert host_memory.accelerator_plugin_installed() is True
  monkeypatch.setattr(importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: object() if name == 'libtpu' else None)
  assert host_memory.accelerator_plugin_installed() is True
