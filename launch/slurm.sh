#!/usr/bin/env bash
# Multi-node GPUs with SLURM: one task per node, each seeing its node's GPUs; jax.distributed
# initialises from the SLURM environment (blip_jax.distributed).
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh configs/pretrain.py:vit_b /shared/ckpt/run1 \
#     --config.batch_size=2880 --config.mesh.fsdp=8 \
#     --config.data.source.kind=tfrecord --config.data.source.files='/shared/laion/*.tfrecord' --config.steps_per_epoch=5000
#SBATCH --job-name=blip-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?config}; WORKDIR=${2:?workdir (on a shared file system)}; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
srun --kill-on-bad-exit=1 .venv/bin/blip-jax train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.dtype=bfloat16 "$@"
