#!/usr/bin/env bash
# Run a megarank command in the container on this machine (Docker + NVIDIA Container Toolkit).
#
#   launch/container/run.sh megarank launch configs/llama3_2_1b.yaml checkpoint.dir=/checkpoints/l1b \
#       checkpoint.load=/checkpoints/l1b-base data.train_path=/data/msmarco-beir
#   launch/container/run.sh megarank evaluate /checkpoints/l1b --data /data/beir/scifact
#   launch/container/run.sh            # an interactive shell
#
# Mounts: DATA_DIR -> /data (read-only), CHECKPOINT_DIR -> /checkpoints, this checkout -> /workspace/megarank
# (the working directory, so configs/... paths work). The image supplies the dependencies; the code that runs
# is this checkout (PYTHONPATH), as under SLURM, so an edit needs no rebuild.
#
# Environment: IMAGE (megarank:latest), DATA_DIR (./data), CHECKPOINT_DIR (./runs), GPUS (all), DOCKER (docker;
# podman works too), EXTRA_DOCKER_ARGS, DRY_RUN=1 (print the docker command only).
#
# --ipc=host: PyTorch workers share tensors through /dev/shm, and Docker's default 64 MB is far too small;
# with IPC=private the container gets its own /dev/shm of SHM_SIZE (16g) instead. memlock/stack ulimits are
# the ones NVIDIA recommends for NCCL and the NGC images.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-megarank:latest}
DATA_DIR=$(realpath -m "${DATA_DIR:-$REPO/data}")
CHECKPOINT_DIR=$(realpath -m "${CHECKPOINT_DIR:-$REPO/runs}")
DOCKER=${DOCKER:-docker}

args=(run --rm --gpus "${GPUS:-all}" --ulimit memlock=-1 --ulimit stack=67108864
      -v "$DATA_DIR:/data:ro" -v "$CHECKPOINT_DIR:/checkpoints" -v "$REPO:/workspace/megarank"
      -w /workspace/megarank -e PYTHONPATH=/workspace/megarank)
if [[ ${IPC:-host} == host ]]; then args+=(--ipc=host); else args+=(--shm-size="${SHM_SIZE:-16g}"); fi
if [[ -t 0 && -t 1 ]]; then args+=(-it); fi
if [[ -n ${EXTRA_DOCKER_ARGS:-} ]]; then read -r -a extra <<<"$EXTRA_DOCKER_ARGS"; args+=("${extra[@]}"); fi
cmd=("$@")
if [[ ${#cmd[@]} -eq 0 ]]; then cmd=(bash); fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$DOCKER" "${args[@]}" "$IMAGE" "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$CHECKPOINT_DIR"
exec "$DOCKER" "${args[@]}" "$IMAGE" "${cmd[@]}"
