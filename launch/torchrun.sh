#!/usr/bin/env bash
# Train on this machine with torchrun: one agent, NPROC workers (GPUs with NCCL, or CPU processes with gloo).
#
#   NPROC=8 launch/torchrun.sh configs/llama3_2_1b.yaml checkpoint.dir=runs/l1b checkpoint.load=runs/l1b-base
#   NPROC=2 launch/torchrun.sh configs/tiny.yaml train.steps=10 checkpoint.dir=runs/tiny     # CPU, 2 gloo ranks
#   DRY_RUN=1 NPROC=8 NNODES=4 MASTER_ADDR=node001 launch/torchrun.sh CONFIG ...   # check layout, print command
#
# Arguments are the config and section.key=value overrides of `megarank train`. The config is checked against
# the world size (NNODES x NPROC) before anything starts, then this becomes
#   python -m torch.distributed.run --nnodes=.. --nproc-per-node=.. (--standalone | --rdzv-backend=c10d
#     --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$RDZV_ID) --role=rank --tee=3 --local-ranks-filter=..
#     -m megarank.cli train CONFIG OVERRIDES
# (built by megarank/cli/launch.py, the same code `megarank launch` and launch/slurm/train.sbatch use).
#
# Several nodes by hand: run this on every node with the same NNODES, MASTER_ADDR (the first node) and
# MASTER_PORT; on SLURM use launch/slurm/train.sbatch instead.
#
# Stopping: `megarank launch` runs the torchrun agent in its own process. `kill -TERM` it and the agent forwards
# SIGTERM to every worker; they save the step they are in, publish <checkpoint.dir>/latest and exit, all within
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30), after which the agent SIGKILLs them. The first Ctrl-C
# (SIGINT) saves the same way and exits 130 with one line; a second one stops the workers at once, unsaved. After a `kill -9` of the agent the workers stop within a second, unsaved.
# While a run is alive its checkpoint.dir is locked (<checkpoint.dir>/.lock): a second run there is refused.
#
# Environment: NPROC (default: visible GPUs, else 1), NNODES (1), MASTER_ADDR, MASTER_PORT (29500), RDZV_ID,
# RDZV_BACKEND (c10d | static, with NODE_RANK), LOG_RANKS (local ranks on the console; default 0 and the rank
# that logs training steps), LOG_DIR (every rank's output as files), PYTHON (python), DRY_RUN (1 = print only).
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ ${DRY_RUN:-0} == 1 ]]; then set -- --dry-run "$@"; fi
exec "$PYTHON" -m megarank.cli.launch "$@"
