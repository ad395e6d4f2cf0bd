"""Keeping freed host memory mapped, so that CPU steps stop page-faulting their buffers in.

XLA's CPU runtime allocates each run of a compiled program its temporary buffer
(274 MB per device for the `cifar10_lt` stage-1 step), and each Eigen convolution a
packing buffer (38 MB there), with `malloc`, and frees them at the end. glibc serves
blocks above its mmap threshold (at most 32 MB) with a fresh `mmap` and returns them
with `munmap` at `free`, so every step touched its whole working set as new pages:
on this project's 2-core development machine, about 120,000 page faults and 0.4 s
of kernel time per step, a fifth of the step's CPU time (docs/performance.md).

`retain_freed_memory()` tells glibc's allocator, through `mallopt`, to serve every
thread from one arena (`M_ARENA_MAX` 1), never to use `mmap` (`M_MMAP_MAX` 0) and
to give the heap's free top back to the system only above 2 GiB
(`M_TRIM_THRESHOLD`). Freed buffers then stay mapped and the next step reuses them:
the process keeps its peak host memory (measured on `cifar10_lt`: 2.2 GB resident
against 1.4 GB, for 15% to 27% more images/s). Outside imbal_jax's commands,
glibc's environment variable makes the same settings:
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.

It must run before JAX starts its backends: a thread takes its arena at its first
`malloc`, and XLA's threads start with the backend; blocks that a thread's own arena
cannot hold are mapped with `mmap` whatever `M_MMAP_MAX` says.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

import jax

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
# Set to 0 to leave the allocator as it is.
ENV_SWITCH = 'IMBAL_JAX_RETAIN_HOST_MEMORY'
_retained = False


def retained() -> bool:
  """Whether `retain_freed_memory` changed this process's allocator."""
  return _retained


def accelerator_plugin_installed() -> bool:
  """Whether JAX may find a GPU or TPU here: a PJRT plugin (jax-cuda, jax-rocm) or libtpu."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins  # namespace package of older plugins
  except ImportError:
    return False
  return any(True for _ in getattr(jax_plugins, '__path__', ()))


def _jax_platforms() -> str:
  return jax.config.jax_platforms or ''


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: assume the worst
    return True


def why_not() -> str | None:
  """Why `retain_freed_memory` would change nothing here; None when it would apply."""
  if os.environ.get(ENV_SWITCH, '1') == '0':
    return f'{ENV_SWITCH}=0'
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return 'not Linux with glibc'
  if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    return 'GLIBC_TUNABLES already sets glibc.malloc options'
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):
    return 'LD_PRELOAD replaces malloc'
  platforms = _jax_platforms()
  if platforms:
    if platforms.lower() != 'cpu':
      return f'JAX_PLATFORMS={platforms} (CPU only)'
  elif accelerator_plugin_installed():
    return 'a GPU or TPU plugin is installed (CPU-only installs only)'
  if _backends_started():
    return "JAX's backends have already started"
  return None


def retain_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory mapped (module docstring); returns whether
  it did. Only on CPU-only JAX installs (or JAX_PLATFORMS=cpu), Linux with glibc,
  before JAX's backends start, unless the environment already chooses the allocator's
  behaviour (GLIBC_TUNABLES, LD_PRELOAD) or IMBAL_JAX_RETAIN_HOST_MEMORY=0."""
  global _retained
  if why_not() is not None:
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  _retained = all([libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS])
  return _retained
