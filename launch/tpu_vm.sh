#!/usr/bin/env bash
# Run a dmd_jax job on a Cloud TPU VM or pod slice (every worker runs the same command).
#
#   launch/tpu_vm.sh create                 # create the TPU VM / slice
#   launch/tpu_vm.sh install                # clone + pip install on every worker
#   launch/tpu_vm.sh run --config configs/demo.py:pipeline --workdir gs://BUCKET/runs/demo
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (v5litepod-8, v4-32, ...),
# RUNTIME (the TPU VM image), REPO (git URL), BRANCH. On a multi-host slice every worker
# runs the job with DMD_DISTRIBUTED=auto: jax.distributed.initialize() finds the other
# hosts, and each host loads only its rows of every global batch. Use a workdir all hosts
# share: a bucket (gs://...) or a Filestore/NFS mount. Checkpoints are written
# cooperatively and the main host writes the rest. A gs:// data dir is mirrored to each
# host's local disk once (--config.data.cache_dir; array_record is read locally).
set -euo pipefail

TPU_NAME=${TPU_NAME:-dmd-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/dmd-jax/dmd_jax.git}
BRANCH=${BRANCH:-main}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  install)
    on_all_workers "set -e; [ -d dmd_jax ] || git clone -b $BRANCH $REPO dmd_jax; cd dmd_jax; \
      git pull --ff-only; python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
      .venv/bin/pip install -q -e '.[tpu]'" ;;
  run)
    shift
    args=$(printf '%q ' "$@")
    on_all_workers "cd dmd_jax && DMD_DISTRIBUTED=auto .venv/bin/python -m dmd_jax.main $args" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
