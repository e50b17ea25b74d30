#!/usr/bin/env bash
# Train a stage on every worker of a Cloud TPU pod slice. Each worker runs the same command;
# FO_JAX_DISTRIBUTED=auto makes fo-jax call jax.distributed.initialize(), which discovers the
# other workers, so one mesh spans the whole slice. WORKDIR must be a filesystem all workers share.
# Usage: TPU=name ZONE=zone REPO=~/fo_jax launch/tpu_pod.sh CONFIG WORKDIR [fo-jax train options...]
# Reruns after a preemption (up to RETRIES times): training resumes from WORKDIR/checkpoints.
set -uo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo=${REPO:-~/fo_jax}
retries=${RETRIES:-3}
args=$(printf ' %q' "$@")
for attempt in $(seq 0 "$retries"); do
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "cd $repo && FO_JAX_DISTRIBUTED=auto .venv/bin/fo-jax train --config $config --workdir $workdir$args" && exit 0
  echo "attempt $attempt failed; resuming from $workdir" >&2
  sleep 30
done
exit 1
