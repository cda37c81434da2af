#!/usr/bin/env bash
# A TPU VM slice: create it (or reuse it), install on every worker, run on all workers at once.
#   launch/tpu_pod.sh NAME ZONE v4-32 configs/pretrain.py:vit_b gs://bucket/blip/run1 \
#     --config.data.source.kind=tfrecord --config.data.source.files='gs://bucket/laion/*.tfrecord' \
#     --config.steps_per_epoch=20000 --config.mesh.fsdp=4
# The workdir must be a gs:// path (or other storage every worker sees). jax.distributed initialises
# itself on TPU pods. Check the memory first, on any machine (docs/pretraining.md "Memory before launch"):
#   blip-jax compile --config=configs/pretrain.py:vit_b --topology=v4-32 --libtpu=DIR [same overrides]
# A preempted slice saves the same step on every worker; rerun this script to resume.
# COMMAND=bootstrap runs `blip-jax bootstrap` (configs/bootstrap.py) instead of `blip-jax train`.
set -euo pipefail
NAME=${1:?tpu name}; ZONE=${2:?zone}; TYPE=${3:?accelerator type, e.g. v4-32}; CONFIG=${4:?config}; WORKDIR=${5:?workdir}
shift 5
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
fi
REPO=${REPO:-$(git config --get remote.origin.url)}
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }
ssh_all "set -e; [ -d blip_jax ] || git clone $REPO blip_jax; cd blip_jax && git pull --ff-only && \
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt && \
  .venv/bin/pip install -q --no-deps -e . && .venv/bin/pip install -q 'jax[tpu]==0.10.2' \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
ARGS=$(printf " %q" "$@")
COMMAND=${COMMAND:-train}
DTYPE=--config.model.dtype=bfloat16  # bootstrap: each stage's config has its own (--config.pretrain.model.dtype=...)
[ "$COMMAND" = train ] || DTYPE=
ssh_all "cd blip_jax && TF_CPP_MIN_LOG_LEVEL=2 nohup .venv/bin/blip-jax $COMMAND --config=$CONFIG --workdir=$WORKDIR \
  $DTYPE $ARGS > train.log 2>&1 &"
echo "started on all workers of $NAME; logs: train.log on each worker; TensorBoard: $WORKDIR/tb"
