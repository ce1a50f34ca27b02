#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU pod slice.
#
#   TPU_ZONE=us-central2-b launch/tpu_pod.sh TPU_NAME CMD [ARGS...]
#   e.g. TPU_ZONE=us-central2-b SAEMNESIA_REMOTE_DIR=saemnesia_jax \
#          launch/tpu_pod.sh my-v4-32 python -m saemnesia_jax.evaluate --config configs/sd15.py
#
# Every worker runs CMD with SAEMNESIA_AUTO_DISTRIBUTED=1, so that
# saemnesia_jax.units.initialize_distributed() calls jax.distributed.initialize()
# without arguments: on a TPU pod jax finds the coordinator and the process
# ids itself.
#
# Environment:
#   TPU_ZONE              the zone of the TPU VM (required)
#   TPU_PROJECT           the Google Cloud project (default: gcloud's)
#   SAEMNESIA_REMOTE_DIR  folder to cd into on each worker, relative to the
#                         home folder (default: stay in the home folder)
#
# The code (and its pip install) must already be on every worker, e.g. with
# `gcloud compute tpus tpu-vm scp --worker=all` or a git clone per worker.
# gcloud prints every worker's output, interleaved; it exits non-zero if a
# worker's command fails.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: TPU_ZONE=ZONE $0 TPU_NAME CMD [ARGS...]" >&2
  exit 2
fi
NAME=$1; shift
: "${TPU_ZONE:?set TPU_ZONE to the zone of the TPU VM}"

# Quote every argument so that it reaches the worker's shell unchanged.
REMOTE="SAEMNESIA_AUTO_DISTRIBUTED=1 $(printf '%q ' "$@")"
if [[ -n ${SAEMNESIA_REMOTE_DIR:-} ]]; then
  REMOTE="cd $(printf '%q' "$SAEMNESIA_REMOTE_DIR") && $REMOTE"
fi

exec gcloud compute tpus tpu-vm ssh "$NAME" --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"} \
  --worker=all --command="$REMOTE"
