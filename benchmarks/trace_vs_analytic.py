"""Analytic memory model vs FakeTensorMode trace on real-size architectures (no GPU, no weights).

    python benchmarks/trace_vs_analytic.py            # the full table (about 20 minutes on 2 CPU cores)
    python benchmarks/trace_vs_analytic.py --quick    # 4 rows

Prints a Markdown table: the trace's peak of live tensor bytes, the analytic model's tensor peak (the same
quantity: no CUDA context, no allocator margin) and their ratio, which must lie in [1.00, 1.10].
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "fixtures" / "configs"
MODELS = {
    "Qwen2.5-0.5B": "qwen2.5-0.5b-instruct",
    "Qwen2.5-7B": "qwen2.5-7b-instruct",
    "Llama-3-8B": "llama-3-8b-instruct",
}
SHAPES = [(1, 512), (8, 512), (1, 4096), (8, 4096)]


def rows(quick: bool):
    if quick:
        yield "Qwen2.5-0.5B", "none", False, (2, 1024)
        yield "Qwen2.5-7B", "4bit", True, (4, 2048)
        yield "Llama-3-8B", "none", True, (1, 4096)
        yield "Llama-3-8B", "4bit", False, (8, 512)
        return
    for model, quant, gc, mbs in itertools.product(MODELS, ("none", "4bit"), (False, True), SHAPES):
        yield model, quant, gc, mbs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--with-70b", action="store_true", help="add Llama-3-70B QLoRA rows (about a minute each)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import json

    from loraforge.memory import TrainSetup, estimate, shape_from_config
    from loraforge.trace import trace_step

    todo = list(rows(args.quick))
    if args.with_70b:
        MODELS["Llama-3-70B"] = "llama-3-70b-instruct"
        todo += [("Llama-3-70B", "4bit", True, (1, 4096)), ("Llama-3-70B", "4bit", True, (8, 4096))]
    print("| model | method | checkpointing | micro-batch x seq | trace GiB | analytic GiB | analytic / trace | trace s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    worst = (9.9, 0.0)
    for model, quant, gc, (mb, seq) in todo:
        cfg = json.loads((CONFIGS / MODELS[model] / "config.json").read_text())
        shape = shape_from_config(cfg, MODELS[model])
        setup = TrainSetup(micro_batch=mb, seq_len=seq, gradient_checkpointing=gc, quant=quant)
        t0 = time.time()
        tr = trace_step(shape, setup)
        est = estimate(shape, setup)
        ratio = est.tensor_peak / tr.peak_bytes
        worst = (min(worst[0], ratio), max(worst[1], ratio))
        method = "QLoRA 4-bit" if quant == "4bit" else "LoRA bf16"
        print(f"| {model} | {method} | {'on' if gc else 'off'} | {mb} x {seq} | {tr.peak_gib:.2f} | "
              f"{est.tensor_peak / 2**30:.2f} | {ratio:.3f} | {time.time() - t0:.0f} |", flush=True)
    print(f"\nanalytic / trace: min {worst[0]:.3f}, max {worst[1]:.3f}")
    return 0 if 1.0 <= worst[0] and worst[1] <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
