"""The device mesh and how arrays are laid out on it.

One mesh axis, 'data'. Batches are sharded along it; the train state is
replicated. The mesh uses Auto axis types (jax.sharding.Mesh's default), so
a loss over the batch-sharded global array may contract over the batch
(z @ z.T) and the compiler inserts the all-gather.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# XLA options of every program imbal_jax compiles for CPU devices: YNNPACK
# fusions for reductions and matrix products only, so that XLA's CPU backend runs
# convolutions through Eigen. Measured on the 2-core development machine (jax
# 0.10.2, x86-64 AVX2), one process compiling the step three ways and
# alternating them, median images/s, XLA's default / no YNNPACK fusions / these:
# cifar10_lt stage 1, 126 / 141 / 143 (2 devices) and 81 / 127 / 133 (1 device);
# ham10000 stage 1, 147 / 165 / 171; cifar10_lt stage 2, 657 / 729 / 779
# (docs/performance.md).
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
}


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = 'config.batch_size') -> None:
  num_devices = mesh.devices.size
  if batch_size % num_devices:
    lower = batch_size - batch_size % num_devices
    raise ValueError(
        f'{field}={batch_size} is the GLOBAL batch and must be divisible by the '
        f'{num_devices} devices in use; try {max(lower, num_devices)} or '
        f'{lower + num_devices}.')


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host arrays of this process's part of the global batch -> global jax.Arrays."""
  sharding = data_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in batch.items()}


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


@functools.cache
def _cpu_options_accepted(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this XLA knows `options` (an XLA without one refuses to compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jax.ShapeDtypeStruct((), np.float32)).compile()
  except Exception as error:  # pylint: disable=broad-except  # XLA's error type varies
    logging.warning('XLA refused the CPU compiler options %s (%s); compiling without them.',
                    dict(options), str(error).splitlines()[0][:200])
    return False
  return True


def compiler_options(mesh: Mesh) -> dict[str, Any]:
  """The XLA options for programs compiled for `mesh`: CPU_COMPILER_OPTIONS on CPU, else none."""
  if mesh.devices.flat[0].platform != 'cpu':
    return {}
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  return dict(options) if _cpu_options_accepted(options) else {}
