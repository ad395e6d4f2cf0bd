#!/usr/bin/env bash
# Both stages on one machine, using every accelerator it has (GPUs or TPU cores).
#
# Assumes: the package is installed (`make install`, or `pip install -e .` plus
# a CUDA or TPU build of jax), and that RUN names a writable directory.
# One process drives all local devices: jit shards each global batch over the
# 'data' mesh axis, so config.batch_size is the GLOBAL batch and must be
# divisible by the number of devices (the run stops with a clear message
# otherwise). Several hosts: launch/tpu_pod.sh (Cloud TPU VM pod slices) and
# launch/slurm_gpu.sbatch (GPU nodes under SLURM).
#
# Usage: launch/single_host.sh RUN [extra --config.FIELD=VALUE overrides]
set -euo pipefail
RUN=${1:?usage: launch/single_host.sh RUN_DIR [overrides...]}
shift
python -m imbal_jax.main --config=configs/stage1.py --workdir="$RUN/stage1" "$@"
python -m imbal_jax.main --config=configs/stage2.py --workdir="$RUN/stage2" \
    --config.init_from="$RUN/stage1"
