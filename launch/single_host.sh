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
# Usage: [CONFIG=configs/stage1.py:PRESET] launch/single_host.sh RUN \
#            [stage-1 --config.FIELD=VALUE ...] [-- stage-2 --config.FIELD=VALUE ...]
# Stage 2 uses the same preset (configs/stage2.py:PRESET, or STAGE2_CONFIG) and
# inherits the data and model from stage 1.
set -euo pipefail
RUN=${1:?usage: launch/single_host.sh RUN_DIR [stage-1 overrides] [-- stage-2 overrides]}
shift
CONFIG=${CONFIG:-configs/stage1.py}
source "$(dirname "${BASH_SOURCE[0]}")/stages.sh" "$@"

python -m imbal_jax.main --config="$CONFIG" --workdir="$RUN/stage1" \
    ${stage1_args[@]+"${stage1_args[@]}"}
python -m imbal_jax.main --config="$STAGE2_CONFIG" --workdir="$RUN/stage2" \
    --config.init_from="$RUN/stage1" ${stage2_args[@]+"${stage2_args[@]}"}
