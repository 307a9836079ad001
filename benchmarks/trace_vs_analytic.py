"""Analytic memory model vs FakeTensorMode trace on real-size architectures (no GPU, no weights).

    python benchmarks/trace_vs_analytic.py            # the full table (about 20 minutes on 2 CPU cores)
    python benchmarks/trace_vs_analytic.py --quick    # 4 rows
    python benchmarks/trace_vs_analytic.py --families # every decoder family at real size (about 15 minutes)

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
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES = {  # model -> (fixture config, LoRA targets); MoE: attention only (QLoRA cannot quantize the experts)
    "Llama-3.2-3B (rope scaling)": ("llama-3.2-3b-instruct", "all-linear"),
    "SmolLM2-1.7B": ("smollm2-1.7b-instruct", "all-linear"),
    "SmolLM3-3B": ("smollm3-3b", "all-linear"),
    "Qwen3-4B": ("qwen3-4b", "all-linear"),
    "Qwen3-30B-A3B (MoE)": ("qwen3-30b-a3b", ATTENTION),
    "Mixtral-8x7B (MoE)": ("mixtral-8x7b-instruct", ATTENTION),
    "Granite-3.0-1B-A400M (MoE, meta build)": ("granite-3.0-1b-a400m-instruct", ATTENTION),
    "Gemma-2-2B": ("gemma-2-2b-it", "all-linear"),
    "Gemma-3-1B": ("gemma-3-1b-it", "all-linear"),
    "Phi-3-mini": ("phi-3-mini-4k-instruct", "all-linear"),
    "Mistral-Nemo-12B": ("mistral-nemo-instruct-2407", "all-linear"),
}


def family_rows():
    for model, (_, targets) in FAMILIES.items():
        moe = targets == ATTENTION
        yield model, "none", False, (1, 2048), targets
        yield model, "none" if moe else "4bit", True, (4, 4096), targets


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
    ap.add_argument("--families", action="store_true", help="every decoder family (real size), 2 rows each")
    ap.add_argument("--with-70b", action="store_true", help="add Llama-3-70B QLoRA rows (about a minute each)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import json

    from loraforge.model.trace import trace_step
    from loraforge.plan.memory import TrainSetup, estimate, shape_from_config

    todo = [r + ("all-linear",) for r in rows(args.quick)]
    if args.families:
        MODELS.update({m: cfg for m, (cfg, _) in FAMILIES.items()})
        todo = list(family_rows())
    if args.with_70b:
        MODELS["Llama-3-70B"] = "llama-3-70b-instruct"
        todo += [("Llama-3-70B", "4bit", True, (1, 4096), "all-linear"), ("Llama-3-70B", "4bit", True, (8, 4096), "all-linear")]
    print("| model | method | checkpointing | micro-batch x seq | trace GiB | analytic GiB | analytic / trace | trace s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    worst = (9.9, 0.0)
    for model, quant, gc, (mb, seq), targets in todo:
        cfg = json.loads((CONFIGS / MODELS[model] / "config.json").read_text())
        shape = shape_from_config(cfg, MODELS[model])
        setup = TrainSetup(micro_batch=mb, seq_len=seq, gradient_checkpointing=gc, quant=quant, lora_targets=targets)
        t0 = time.time()
        tr = trace_step(shape, setup)
        est = estimate(shape, setup)
        ratio = est.tensor_peak / tr.peak_bytes
        worst = (min(worst[0], ratio), max(worst[1], ratio))
        method = ("QLoRA 4-bit" if quant == "4bit" else "LoRA bf16") + ("" if targets == "all-linear" else " (attention)")
        print(f"| {model} | {method} | {'on' if gc else 'off'} | {mb} x {seq} | {tr.peak_gib:.2f} | "
              f"{est.tensor_peak / 2**30:.2f} | {ratio:.3f} | {time.time() - t0:.0f} |", flush=True)
    print(f"\nanalytic / trace: min {worst[0]:.3f}, max {worst[1]:.3f}")
    return 0 if 1.0 <= worst[0] and worst[1] <= (1.05 if args.families else 1.10) else 1


if __name__ == "__main__":
    sys.exit(main())
