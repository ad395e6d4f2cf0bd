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
# Stage 2 starts from the same preset (configs/stage2.py:PRESET) where CONFIG is
# configs/stage1.py[:PRESET]; with another stage-1 config file, set STAGE2_CONFIG.
preset=''
if [[ $CONFIG == *:* ]]; then preset=":${CONFIG##*:}"; fi
if [[ -z ${STAGE2_CONFIG:-} && ${CONFIG%%:*} != configs/stage1.py ]]; then
  echo "$0: CONFIG=$CONFIG is not configs/stage1.py[:PRESET]; set STAGE2_CONFIG too" >&2
  exit 2
fi
STAGE2_CONFIG=${STAGE2_CONFIG:-configs/stage2.py$preset}
# After RUN: overrides for stage 1, then, after a lone --, overrides for stage 2.
stage1_args=() stage2_args=() into=1
for arg in "$@"; do
  if [[ $arg == -- && $into == 1 ]]; then into=2; continue; fi
  if [[ $into == 1 ]]; then stage1_args+=("$arg"); else stage2_args+=("$arg"); fi
done

python -m imbal_jax.main --config="$CONFIG" --workdir="$RUN/stage1" \
    ${stage1_args[@]+"${stage1_args[@]}"}
python -m imbal_jax.main --config="$STAGE2_CONFIG" --workdir="$RUN/stage2" \
    --config.init_from="$RUN/stage1" ${stage2_args[@]+"${stage2_args[@]}"}
