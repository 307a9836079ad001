#!/usr/bin/env bash
# Train a recipe on all GPUs of this machine with plain `accelerate launch` (copy and edit freely).
#   launch/train.sh RECIPE [--set key=value ...]
# One GPU (or none): a single process. Several: DDP, one process per GPU. Every process runs the same
# entry point, `python -m loraforge.train`, and computes the same plan.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 1 ]; then
  exec accelerate launch --config_file "$here/accelerate_configs/ddp.yaml" --num_processes "$ngpu" \
    -m loraforge.train "$@"
fi
exec accelerate launch --config_file "$here/accelerate_configs/single_gpu.yaml" -m loraforge.train "$@"
