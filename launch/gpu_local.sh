#!/usr/bin/env bash
# One machine, one or more local GPUs (one process sees them all).
#   launch/gpu_local.sh configs/pretrain.py:vit_b /ckpt/blip_vit_b --config.batch_size=64 --config.loss.queue_size=57600
# A CUDA JAX must be installed in .venv first:  .venv/bin/pip install -U "jax[cuda12]==0.10.2"
set -euo pipefail
CONFIG=${1:?config, e.g. configs/pretrain.py:vit_b}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/blip-jax train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.dtype=bfloat16 "$@"
