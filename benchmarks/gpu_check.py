"""Does what loraforge predicts hold on this GPU? Predicted vs measured peak memory, micro-batch + 1, tokens/s, MFU,
fused vs plain loss head, for a few real-size architectures with random weights (nothing downloaded).

    python benchmarks/gpu_check.py                        # on a GPU: plan, measure, write gpu_check/gpu_check.{md,json}
    python benchmarks/gpu_check.py --dry-run --card a100-80gb   # anywhere: the plan only, measured columns empty
    loraforge check-gpu ...                               # the same command, installed

Runs from a checkout without installing loraforge (src/ is put on the path): the check needs torch, transformers,
peft and pyyaml only; bitsandbytes (QLoRA cases) and trl (the fused head) are used when present. See
src/loraforge/gpu_check.py for what is measured.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraforge.run.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
