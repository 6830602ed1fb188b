#!/usr/bin/env bash
# One training run on every worker of a Cloud TPU pod slice (v4 / v5p / v6e, multi-host).
#
#   TPU=my-v5p-32 ZONE=us-east5-a scripts/tpu_pod.sh --config=configs/mini2b.py --config.mesh.fsdp=16
#
# Every worker runs the same command; JAX finds the other workers itself (jax.distributed.initialize
# with no arguments on a TPU VM, asked for by --multihost). The checkout, the checkpoint and the data
# must be at the same path on every worker, and the workdir on storage all workers share (a GCS
# FUSE mount or an NFS filestore): every process writes its part of each checkpoint there.
# Environment: TPU, ZONE (required), PROJECT (optional), REPO_DIR (default ~/mmjax on the workers),
# SETUP=1 to install the project and jax[tpu] on every worker first.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo=${REPO_DIR:-'~/mmjax'}
project=()
[ -z "${PROJECT:-}" ] || project=(--project "$PROJECT")
ssh() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project[@]}" --worker=all --command "$1"; }
if [ "${SETUP:-0}" = 1 ]; then
  ssh "cd $repo && pip install -q -e . && pip install -q -U 'jax[tpu]'"
fi
args=$(printf ' %q' "$@")
ssh "cd $repo && python -m mmjax.train --multihost$args"
