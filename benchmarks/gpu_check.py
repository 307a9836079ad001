"""Does what loraforge predicts hold on this GPU? Predicted vs measured peak memory, micro-batch + 1, tokens/s, MFU,
fused vs plain loss head, for a few real-size architectures with random weights (nothing downloaded).

    python benchmarks/gpu_check.py                        # on a GPU: plan, measure, write gpu_check/gpu_check.{md,json}
    python benchmarks/gpu_check.py --dry-run --card a100-80gb   # anywhere: the plan only, measured columns empty
    loraforge check-gpu ...                               # the same command, installed

Runs from a checkout without installing loraforge (src/ is put on the path): the check needs torch, transformers,
peft and pyyaml only; bitsandbytes (QLoRA cases) and trl (the fused head) are used when present. The side by
side (textbook vs trl defaults vs loraforge) runs this folder's throughput.py and needs loraforge installed with
trl, datasets, pydantic, typer and rich: on an air-gapped node, the bundle of benchmarks/gpu_bundle.py carries
them, this folder and a tokenizer. See src/loraforge/run/gpu_check.py for what is measured.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE.parent / "src" / "loraforge").is_dir():  # a checkout (in the bundle, loraforge is installed)
    sys.path.insert(0, str(HERE.parent / "src"))

from loraforge.run.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(throughput_script=HERE / "throughput.py"))
