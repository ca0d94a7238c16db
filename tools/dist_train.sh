#!/usr/bin/env bash
# Distributed training through torchrun and mmengine's distributed Runner.
# Usage: bash tools/dist_train.sh CONFIG GPUS [tools/train.py options]
#   GPUS = processes per node (one per device; on a CPU-only machine they train with gloo).
#   Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT (same values on every node but NODE_RANK).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG GPUS [train.py options]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
