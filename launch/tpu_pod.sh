#!/usr/bin/env bash
# Both stages on a Cloud TPU VM pod slice (several hosts, e.g. v4-32: 4 hosts).
#
# Run from a checkout of this repository, on a machine with gcloud:
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=/mnt/shared/runs/cifar10 \
#   DATA_BUCKET=gs://my-bucket/tfds launch/tpu_pod.sh configs/stage1.py:cifar10_lt \
#       [stage-1 --config.FIELD=VALUE ...] [-- stage-2 --config.FIELD=VALUE ...]
#
# Stage 2 uses the same preset (configs/stage2.py:cifar10_lt here; STAGE2_CONFIG
# overrides) and inherits the data and model from stage 1.
#
# What it does, on every worker at once (gcloud ... --worker=all):
#   1. copies the committed tree (git archive HEAD) to ~/imbal_jax and installs
#      it with jax[tpu] into ~/imbal_jax/.venv;
#   2. copies the prepared tfds data (array_record) from DATA_BUCKET to
#      ~/tfds on the worker's local disk, read through --config.data_dir;
#   3. runs stage 1, then stage 2, with the same command on every worker.
# Each worker is one JAX process. `--num_processes=N` tells imbal_jax the run
# has N processes; JAX reads the coordinator (worker 0) and this worker's
# process id from the TPU metadata when it calls jax.distributed.initialize.
# Process 0 writes the logs and reports; all processes write the checkpoints
# together.
#
# Assumes:
# - the TPU VM slice exists and gcloud may ssh into it (`gcloud compute tpus
#   tpu-vm ssh TPU_NAME --zone=ZONE --worker=all` works);
# - the workers have Python >= 3.11 as $PYTHON (default python3.11);
# - WORKDIR is a directory on a file system mounted at the same path on every
#   worker (Filestore/NFS, or a bucket mounted with gcsfuse): imbal_jax writes
#   logs and JSON with ordinary file operations, so a gs:// URL does not work;
# - DATA_BUCKET (optional; unset for data sets that need no files, e.g.
#   digits) holds tfds's data_dir, built with
#   `tfds build NAME --file_format=array_record` and copied there;
# - config.batch_size (the GLOBAL batch) is divisible by the number of TPU
#   devices of the whole slice; the run stops with a clear message otherwise.
#
# Pre-emption: SIGTERM on any worker (a maintenance event) makes every worker
# save a checkpoint at the same step and exit with 143; rerunning this script
# resumes from it.
set -euo pipefail

CONFIG=${1:?usage: TPU_NAME=... ZONE=... WORKDIR=... launch/tpu_pod.sh CONFIG [stage-1 overrides] [-- stage-2 overrides]}
shift
source "$(dirname "${BASH_SOURCE[0]}")/stages.sh" "$@"
TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE to the TPU VM zone}
WORKDIR=${WORKDIR:?set WORKDIR to a directory shared by all workers}
DATA_BUCKET=${DATA_BUCKET:-}
PYTHON=${PYTHON:-python3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

# One process per worker: the number of workers is the number of processes.
NUM_WORKERS=${NUM_WORKERS:-$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
    --format='value(networkEndpoints.len())')}
echo "tpu_pod.sh: $TPU_NAME has $NUM_WORKERS workers"

# 1. The code: committed files only (no .venv, no local runs).
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":imbal_jax.tar.gz --zone="$ZONE" --worker=all
on_all_workers "set -euo pipefail; mkdir -p ~/imbal_jax && tar -xzf ~/imbal_jax.tar.gz -C ~/imbal_jax \
  && $PYTHON -m venv ~/imbal_jax/.venv \
  && ~/imbal_jax/.venv/bin/pip install --quiet -e ~/imbal_jax 'jax[tpu]==$JAX_VERSION'"

# 2. The data, on each worker's local disk. The flag is expanded by the worker's
# shell ($HOME there); stage 2 inherits data_dir from stage 1.
data_flag=''
if [[ -n "$DATA_BUCKET" ]]; then
  on_all_workers "set -euo pipefail; mkdir -p ~/tfds && gcloud storage rsync --recursive \
    $(printf '%q' "$DATA_BUCKET") ~/tfds"
  data_flag=' --config.data_dir=$HOME/tfds'
fi

# 3. The two stages; the same command on every worker. run_stage EXTRA ARGS...:
# ARGS are quoted for the worker's shell, EXTRA (the data flag) is not.
run_stage() {
  local extra=$1 args
  shift
  printf -v args ' %q' "$@" --num_processes="$NUM_WORKERS"
  on_all_workers "cd ~/imbal_jax && .venv/bin/python -m imbal_jax.main$args$extra"
}
run_stage "$data_flag" --config="$CONFIG" --workdir="$WORKDIR/stage1" \
    ${stage1_args[@]+"${stage1_args[@]}"}
run_stage '' --config="$STAGE2_CONFIG" --workdir="$WORKDIR/stage2" \
    --config.init_from="$WORKDIR/stage1" ${stage2_args[@]+"${stage2_args[@]}"}
