"""The device mesh and how arrays are laid out on it.

One mesh axis, 'data'. Batches are sharded along it; the train state is
replicated. The mesh uses Auto axis types (jax.sharding.Mesh's default), so
a loss over the batch-sharded global array may contract over the batch
(z @ z.T) and the compiler inserts the all-gather.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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

