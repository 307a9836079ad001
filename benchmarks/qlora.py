"""LoRA vs QLoRA (4-bit NF4, double quant) vs 8-bit (LLM.int8) on the CPU, side by side.

    python benchmarks/qlora.py                              # SmolLM2-135M, 10 steps each
    python benchmarks/qlora.py --models tiny --steps 2      # a smoke run

The same `loraforge train` recipe (throughput.py's records, LoRA r16 on all linear layers, global batch 8,
max length 512), only `quantization.mode` differs; each variant in its own process. Reported: real tokens/s
over the training loop (train_summary.json), the process's peak RSS (wait4), wall time, final train loss,
and the bytes of the base as loaded (weights + quantization constants, loraforge.model.quant.loaded_bytes).
On the CPU a 4-bit base saves memory, not time: bitsandbytes dequantizes every 4-bit weight to fp32 for each
matmul of the forward and again in the backward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import loraforge_recipe, run_child, smollm2_dir, tiny_dir  # noqa: E402

MODES = ("none", "4bit", "8bit")


def base_bytes(model_dir: Path, mode: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.model.quant import loaded_bytes, silence_cpu_kernel_notice

    silence_cpu_kernel_notice()  # bitsandbytes' 'Failed to load CPU gemm_4bit_forward' (quant.py says why)

    q = None
    if mode == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    elif mode == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=q)
    return sum(loaded_bytes(model).values())


def measure(name: str, model_dir: Path, data: Path, work: Path, steps: int, lr: float) -> list[dict]:
    import yaml

    rows = []
    for mode in MODES:
        out = work / name / mode
        out.mkdir(parents=True, exist_ok=True)
        recipe = loraforge_recipe(model_dir, data, steps, lr, out)
        d = yaml.safe_load(recipe.read_text())
        d["quantization"] = {"mode": mode}
        d["data"].pop("eval_sources")
        recipe.write_text(yaml.safe_dump(d, sort_keys=False))
        code, wall, rss = run_child([sys.executable, "-m", "loraforge.train", str(recipe), "--quiet", "--overwrite"],
                                    out / "log.txt")
        if code != 0:
            raise SystemExit(f"{name} {mode}: exit {code}; see {out / 'log.txt'}")
        summary = json.loads((out / "run" / "train_summary.json").read_text())
        losses = [r["loss"] for r in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        rows.append({"model": name, "quantization": mode, "tokens_per_s": summary["tokens_per_second"],
                     "peak_rss_gib": rss, "wall_s": wall, "train_loss_last": losses[-1],
                     "base_bytes": base_bytes(model_dir, mode)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--records", type=int, default=160)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", type=Path, default=Path("runs/bench-qlora"))
    a = p.parse_args()
    import chat_data

    a.work.mkdir(parents=True, exist_ok=True)
    data = a.work / "data"
    chat_data.write(data, train=a.records, held_out=8)
    rows = []
    for name in a.models.split(","):
        model_dir = tiny_dir(a.work) if name == "tiny" else smollm2_dir()
        rows += measure(name, model_dir, data, a.work, a.steps, a.lr)
    (a.work / "results.json").write_text(json.dumps({"steps": a.steps, "rows": rows}, indent=2) + "\n")
    print("| model | quantization | real tokens/s | peak RSS GiB | base MiB (loaded) | wall s | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quantization']} | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | "
              f"{r['base_bytes'] / 2**20:.0f} | {r['wall_s']:.0f} | {r['train_loss_last']:.3f} |")
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["quantization"]: r for r in rows if r["model"] == name}
        for mode in ("4bit", "8bit"):
            print(f"{name}: {mode} / none: {by[mode]['tokens_per_s'] / by['none']['tokens_per_s']:.2f}x real tokens/s, "
                  f"peak RSS {by[mode]['peak_rss_gib']:.2f} vs {by['none']['peak_rss_gib']:.2f} GiB, "
                  f"base {by[mode]['base_bytes'] / 2**20:.0f} vs {by['none']['base_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
