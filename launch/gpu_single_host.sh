#!/usr/bin/env bash
# Train a stage on one GPU host (all its GPUs form the mesh; set the mesh shape with --set mesh.shape=...).
# Usage: launch/gpu_single_host.sh CONFIG WORKDIR [fo-jax train options...]
#   e.g. launch/gpu_single_host.sh configs/text_llm.py:qwen2_0_5b runs/lm --set stage.manifest=data/train.jsonl
# Reruns after a crash or preemption (up to RETRIES times): training resumes from WORKDIR/checkpoints.
set -uo pipefail
config=${1:?config, e.g. configs/text_llm.py:tiny}; workdir=${2:?workdir}; shift 2
retries=${RETRIES:-3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
for attempt in $(seq 0 "$retries"); do
  fo-jax train --config "$config" --workdir "$workdir" "$@" && exit 0
  echo "attempt $attempt failed; resuming from $workdir" >&2
  sleep 10
done
exit 1
