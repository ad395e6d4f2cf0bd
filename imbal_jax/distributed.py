"""Joining the processes of a multi-host run: jax.distributed.initialize at start-up.

Every process of a multi-host run executes the same command. Before JAX
starts its backends they join one distributed runtime: after that
`jax.devices()` lists every device of every host, the 'data' mesh spans them
all, each process feeds its own slice of the global batch, and process 0
writes the logs and the report (orbax checkpoints are written by all of them
together, into the one shared workdir).

When to join:
- A flag names the run (`--coordinator_address`, `--num_processes`,
  `--process_id`): JAX fills in what the flags leave out from the cluster it
  detects (Cloud TPU metadata, SLURM, Open MPI), and fails if it cannot.
- No flag: the environment of a launcher that started several processes,
  detected from its variables (no network queries): a SLURM job step with
  SLURM_NTASKS > 1 (srun), Open MPI with more than one rank, GKE TPU workers
  (TPU_WORKER_HOSTNAMES lists several hosts or there are several slices), or
  JAX_COORDINATOR_ADDRESS set explicitly.
- Otherwise, and with `--num_processes=1`, the run is a single process and
  nothing is initialised.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import jax

from imbal_jax import cpu_conv

# SLURM variables JAX's own SLURM detection reads; SLURM_STEP_NODELIST exists only
# inside a job step (srun), not in the batch script that calls srun.
_SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                    'SLURM_LOCALID')


class LaunchError(ValueError):
  """The multi-process flags or environment cannot start a run; the message says why."""


def _count(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def detected_launcher(environ=os.environ) -> str | None:
  """The launcher that started this process as one of several, from its variables."""
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if all(name in environ for name in _SLURM_VARIABLES) and _count(environ['SLURM_NTASKS']) > 1:
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in environ and _count(environ.get('OMPI_COMM_WORLD_SIZE')) > 1:
    return 'Open MPI'
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h]) > 1 or _count(environ.get('MEGASCALE_NUM_SLICES')) > 1:
    return 'Cloud TPU (GKE)'
  return None


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> None:
  """Raises LaunchError for combinations of the three flags that cannot name a run."""
  if num_processes is not None and num_processes < 1:
    raise LaunchError(f'--num_processes={num_processes} must be at least 1.')
  if process_id is not None:
    if num_processes is None:
      raise LaunchError('--process_id needs --num_processes (the total number of processes); '
                        'give both, with --coordinator_address, or neither to let the cluster '
                        'launcher set them.')
    if not 0 <= process_id < num_processes:
      raise LaunchError(f'--process_id={process_id} must be in 0..{num_processes - 1} '
                        f'(--num_processes={num_processes}).')
    # Under a cluster launcher JAX finds the coordinator itself; the flags fill in the rest.
    if num_processes > 1 and not (coordinator_address or detected_launcher()):
      raise LaunchError('--process_id and --num_processes need --coordinator_address=HOST:PORT '
                        '(process 0\'s host, and a free port there), the same on every process.')
  if num_processes == 1 and coordinator_address:
    raise LaunchError('--coordinator_address is for several processes, but --num_processes=1; '
                      'drop one of them.')
  if coordinator_address and ':' not in coordinator_address:
    raise LaunchError(f'--coordinator_address={coordinator_address} needs a port: HOST:PORT.')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the processes of a multi-process run; returns whether it did.

  Must run before anything starts JAX's backends (jax.devices(), an array).
  Raises LaunchError for bad flags, or when the processes cannot connect.
  """
  check_flags(coordinator_address, num_processes, process_id)
  named = coordinator_address is not None or (num_processes or 1) > 1
  launcher = None if named or num_processes == 1 else detected_launcher()
  if not named and launcher is None:
    return False
  # Several CPU processes exchange collectives through gloo (0.10's default, set
  # explicitly so that a changed default cannot leave them unconnected); the
  # pre-emption service lets SIGTERM on any host stop every host at one step.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_enable_preemption_service', True)
  where = launcher or 'the flags'
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, TypeError) as error:  # JAX could not work out the missing values
    raise LaunchError(
        f'cannot start the multi-process run named by {where}: JAX found no cluster (Cloud '
        f'TPU, SLURM, Open MPI) to fill in what is missing ({error}); give '
        '--coordinator_address, --num_processes and --process_id on every process.') from None
  except Exception as error:  # the runtime's connection errors: timeouts, refused ports
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ''
    raise LaunchError(
        f'process {process_id if process_id is not None else "?"} could not join the '
        f'multi-process run ({type(error).__name__}: {detail}). Check that every process was '
        'started with the same --coordinator_address and --num_processes, that process 0 is '
        'running, and that its port is reachable from every host.') from None
  if jax.default_backend() == 'cpu':
    # On CPU, JAX's persistent compilation cache serves process 0 alone (the key
    # holds a per-process topology fingerprint, and only process 0 writes), so
    # process 0 would load its programs while the others compile theirs, and
    # reach the first collective of a device group later than gloo's fixed 30 s
    # rendezvous allows. Without the cache every process compiles, in step.
    jax.config.update('jax_enable_compilation_cache', False)
  print(f'imbal_jax: process {jax.process_index()} of {jax.process_count()} joined '
        f'(via {where}).', file=sys.stderr)
  return True


def cpu_device_count(batch_sizes: Sequence[int], cores: int | None = None) -> int:
  """The most CPU devices, at most one per core, whose count divides every batch size."""
  cores = cores or len(os.sched_getaffinity(0))
  common = math.gcd(*(int(size) for size in batch_sizes))
  return max(count for count in range(1, max(cores, 1) + 1) if common % count == 0)


def use_cpu_cores(batch_sizes: Sequence[int], cores: int | None = None,
                  float32: bool = True) -> int | None:
  """On CPU, one JAX device per core, so that the data-parallel step spreads over the cores;
  one device where oneDNN's convolutions are on (imbal_jax.cpu_conv).

  oneDNN spreads each convolution over the cores itself: on this project's 2-core
  development machine the `cifar10_lt` stage-1 step ran at 335-418 images/s on one
  device and 191 on two (both devices' oneDNN calls then share the two cores).
  `float32`: whether the run computes in float32 (config.dtype), the only dtype
  oneDNN's convolutions take.
  A single CPU device left this project's stage-1 step short of the cores'
  throughput while XLA ran convolutions through YNNPACK (2 cores: 105 images/s on 1
  device, 150 on 2; with Eigen's convolutions, since, the two are within the noise
  of each other on 2 cores: README, Speed), so the batch is split over
  `cpu_device_count(batch_sizes)` devices instead (JAX's `jax_num_cpu_devices`,
  which does not touch GPU or TPU backends). Returns the count chosen, or None
  where the user chose one (`JAX_NUM_CPU_DEVICES`, XLA_FLAGS'
  `--xla_force_host_platform_device_count`) or JAX's backends already started.
  Call it in a single-process run (`initialize` returned False), before
  anything starts JAX's backends.
  """
  # jax_num_cpu_devices reads JAX_NUM_CPU_DEVICES from the environment (default -1).
  chosen = (jax.config.jax_num_cpu_devices >= 0
            or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''))
  if chosen:
    return None
  # oneDNN's convolutions (imbal_jax.cpu_conv) spread each call over the cores
  # themselves, and run on a single device only; they compute float32 only, so a
  # run computing in bfloat16 (float32=False) keeps XLA's and the per-core split.
  count = (1 if float32 and cpu_conv.available()
           else cpu_device_count(batch_sizes, cores))
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # the backends have started: their device count stays
    return None
  return count


def config_batch_sizes(config) -> list[int]:
  """The batch sizes a run's devices must divide: the global batch, its micro-batches
  under gradient accumulation, and the evaluation batch."""
  sizes = [config.get(field) for field in ('batch_size', 'eval_batch_size')]
  sizes = [int(size) for size in sizes if isinstance(size, int) and size > 0]
  accum = config.get('grad_accum_steps') or 1
  if sizes and accum > 1 and sizes[0] % accum == 0:
    sizes.append(sizes[0] // accum)
  return sizes or [1]
