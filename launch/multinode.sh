#!/usr/bin/env bash
# Run RECIPE on several machines: start this on every node with its own NODE_RANK.
#   NODES=2 NODE_RANK=0 MAIN_IP=10.0.0.1 launch/multinode.sh RECIPE [--strategy zero3] [--set key=value ...]
# loraforge plans the split of the global batch for NODES x GPUS_PER_NODE processes and starts
# `accelerate launch` with a static rendezvous (each node states its own rank: no c10d endpoint trap).
# Add --dry-run to see the exact accelerate command first.
set -euo pipefail
: "${NODES:?set NODES}" "${NODE_RANK:?set NODE_RANK (0 on the first node)}" "${MAIN_IP:?set MAIN_IP (node 0 address)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
recipe=$1; shift
exec loraforge launch "$recipe" --nodes "$NODES" --node-rank "$NODE_RANK" --main-ip "$MAIN_IP" \
  --main-port "${MAIN_PORT:-29500}" --gpus "$GPUS_PER_NODE" "$@"
