"""The multi-process flags of the commands that train or time steps (main, benchmark).

Kept apart from imbal_jax.distributed, which imports JAX: a command defines its flags
before JAX starts, so that --help and flag errors come back at once.
"""

from absl import flags


def define() -> None:
  """--coordinator_address, --num_processes and --process_id (distributed.initialize)."""
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-process runs: HOST:PORT of process 0, the same on every process. '
                      'Left out, it is detected on Cloud TPU, SLURM and Open MPI.')
  flags.DEFINE_integer('num_processes', None,
                       'Multi-process runs: how many processes (usually one per host). '
                       '1 forces a single-process run inside a multi-task launcher.')
  flags.DEFINE_integer('process_id', None,
                       'Multi-process runs: this process, 0..num_processes-1.')
