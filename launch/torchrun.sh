#!/usr/bin/env bash
# The same trainer under plain torchrun, one process per GPU of this machine:
#   launch/torchrun.sh RECIPE [--set key=value ...]
set -euo pipefail
ngpu=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
exec torchrun --standalone --nproc_per_node "${NPROC:-$ngpu}" -m loraforge.train "$@"
