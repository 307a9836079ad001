"""The README's plan tables, generated: recipe x hardware profile, and the comparison with published figures.

    python tests/readme_tables.py           # print both tables
    python tests/readme_tables.py --write   # rewrite them in README.md

tests/test_memory_plan.py regenerates them and fails when README.md is stale. The shipped recipes name hub ids;
here each is planned from a hand-written config.json in tests/fixtures/configs (no hub, no tokenizer, no data).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "fixtures" / "configs"
README = REPO / "README.md"

RECIPES = {  # shipped recipe -> fixture config of its hub model
    "qwen2.5-0.5b-lora": "qwen2.5-0.5b-instruct",
    "qwen2.5-7b-qlora": "qwen2.5-7b-instruct",
    "llama-3-8b-lora": "llama-3-8b-instruct",
    "llama-3-8b-qlora": "llama-3-8b-instruct",
    "llama-3-70b-qlora": "llama-3-70b-instruct",
    "qwen3-4b-lora": "qwen3-4b",
    "qwen3-4b-qlora": "qwen3-4b",
    "qwen3-8b-lora": "qwen3-8b",
    "qwen3-8b-qlora": "qwen3-8b",
    "qwen3-30b-a3b-lora": "qwen3-30b-a3b",
    "granite-3.0-1b-a400m-lora": "granite-3.0-1b-a400m-instruct",
    "gemma-2-2b-qlora": "gemma-2-2b-it",
}
PROFILES = [  # column title, profile, GPUs per node, nodes
    ("rtx3060-12gb", "rtx3060-12gb", 1, 1),
    ("rtx4090-24gb", "rtx4090-24gb", 1, 1),
    ("a100-40gb", "a100-40gb", 1, 1),
    ("a100-80gb", "a100-80gb", 1, 1),
    ("8× a100-80gb", "a100-80gb", 8, 1),
    ("2 nodes × 8× a100-80gb", "a100-80gb", 8, 2),
]
MATRIX_MARKERS = ("<!-- plan-matrix:start -->", "<!-- plan-matrix:end -->")
COMPARISON_MARKERS = ("<!-- published-comparison:start -->", "<!-- published-comparison:end -->")


def plan_for(recipe_name: str, config_dir: str, profile: str | None, gpus: int = 1, nodes: int = 1,
             overrides: list[str] | tuple = (), vram: float | None = None) -> dict:
    from loraforge.launch import preview as planview
    from loraforge.plan.profiles import hardware_for
    from loraforge.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml",
                         [f"model.name_or_path={CONFIGS / config_dir}", *overrides])
    return planview.build(recipe, hardware_for(profile, vram, gpus, nodes)).to_dict()


def cell(out: dict) -> str:
    gc = "GC on" if out["gradient_checkpointing"] else "GC off"
    if out["fits"]:
        return (f"{out['micro_batch_size']}×{out['gradient_accumulation_steps']}×{out['world_size']} · "
                f"{out['max_seq_length']} · {gc} · {out['strategy']} · **{out['predicted_peak_gib']:.1f} GiB**")
    alt = out["suggestions"][0] if out["suggestions"] else "no alternative found"
    return f"does not fit ({out['predicted_peak_gib']:.1f} > {out['budget_gib']:.1f} GiB); {alt}"


def matrix() -> str:
    head = "| recipe (global batch) | " + " | ".join(t for t, *_ in PROFILES) + " |"
    lines = [head, "|---" * (len(PROFILES) + 1) + "|"]
    for name, cfg in RECIPES.items():
        cells = []
        gb = None
        for _, profile, gpus, nodes in PROFILES:
            out = plan_for(name, cfg, profile, gpus, nodes)
            gb = out["requested_global_batch_size"]
            cells.append(cell(out))
        lines.append(f"| `{name}` ({gb}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Published figures, at their own settings (hardware, batch, sequence, LoRA targets, checkpointing).
PUBLISHED = [
    dict(source="LLaMA-Factory README, hardware table", what="7B QLoRA 4-bit", published="≈ 6 GB",
         published_gib=6 * 1e9 / 2**30, config="llama-2-7b", recipe="llama-3-8b-qlora", card=None, lora="r=8 all-linear",
         overrides=["lora.r=8", "lora.alpha=16", "data.max_seq_length=512", "training.global_batch_size=1",
                    "training.gradient_checkpointing=true"]),
    dict(source="LLaMA-Factory README, hardware table", what="7B LoRA 16-bit", published="≈ 16 GB",
         published_gib=16 * 1e9 / 2**30, config="llama-2-7b", recipe="llama-3-8b-lora", card=None, lora="r=8 all-linear",
         overrides=["lora.r=8", "lora.alpha=16", "data.max_seq_length=512", "training.global_batch_size=1",
                    "training.gradient_checkpointing=true"]),
    dict(source="torchtune memory table (Llama-3.1-8B, batch 2, packed 2048, activation checkpointing)",
         what="QLoRA", published="7.4 GiB", published_gib=7.4, config="llama-3.1-8b", recipe="llama-3-8b-qlora",
         card=None, lora="r=8 q,v,o + MLP",
         overrides=["lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
                    "lora.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                    "data.max_seq_length=2048", "training.global_batch_size=2", "training.micro_batch_size=2",
                    "training.gradient_checkpointing=true"]),
    dict(source="torchtune memory table (Llama-3.1-8B, batch 2, packed 2048, activation checkpointing)",
         what="LoRA", published="16.2 GiB", published_gib=16.2, config="llama-3.1-8b", recipe="llama-3-8b-lora",
         card=None, lora="r=8 q,v,o + MLP",
         overrides=["lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
                    "lora.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                    "data.max_seq_length=2048", "training.global_batch_size=2", "training.micro_batch_size=2",
                    "training.gradient_checkpointing=true"]),
    *[dict(source=f"Unsloth notebook `{nb}` on a Colab T4 (its printed peak reserved; batch 2, max length 2048, "
                  "Unsloth's offloaded checkpointing)",
           what=what, published=f"{gib} GiB", published_gib=gib, config=config, recipe="qwen3-8b-qlora", card=None,
           lora=f"r={r} {'all-linear (fused qkv/gate_up)' if config == 'phi-4' else 'q,k,v,o + MLP'}, 8-bit AdamW",
           overrides=[f"lora.r={r}", f"lora.alpha={alpha}", "lora.dropout=0.0",
                      "lora.target_modules=" + ("all-linear" if config == "phi-4" else
                                                "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"),
                      "data.max_seq_length=2048", "training.global_batch_size=8", "training.micro_batch_size=2",
                      "training.gradient_checkpointing=true", "training.optimizer=adamw_8bit"])
      for nb, what, gib, config, r, alpha in [
          ("Qwen3_(14B).ipynb", "Qwen3-14B QLoRA", 14.066, "qwen3-14b", 32, 32),
          ("Phi_4-Conversational.ipynb", "Phi-4 (14B) QLoRA", 12.361, "phi-4", 16, 16),
          ("Mistral_Nemo_(12B)-Alpaca.ipynb", "Mistral-Nemo-12B QLoRA", 10.68, "mistral-nemo-instruct-2407", 16, 16)]],
    dict(source="QLoRA paper (Dettmers et al. 2023): 65B fine-tuned on one 48 GB GPU", what="LLaMA-65B QLoRA r=64",
         published="fits in 48 GB", published_gib=None, config="llama-65b", recipe="llama-3-70b-qlora", card=48,
         lora="r=64 all-linear, paged 8-bit AdamW",
         overrides=["lora.r=64", "lora.alpha=16", "lora.dropout=0.05", "data.max_seq_length=512",
                    "training.global_batch_size=16", "training.micro_batch_size=1",
                    "training.gradient_checkpointing=true", "training.optimizer=paged_adamw_8bit"]),
]


def comparison() -> str:
    lines = ["| source | setting | published | loraforge plan | predicted GiB | verdict |", "|---|---|---|---|---:|---|"]
    for p in PUBLISHED:
        card = p["card"]
        out = plan_for(p["recipe"], p["config"], None if card else "a100-80gb", overrides=p["overrides"], vram=card)
        pred = out["predicted_peak_gib"]
        gc = "GC on" if out["gradient_checkpointing"] else "GC off"
        setting = f"micro-batch {out['micro_batch_size']} · seq {out['max_seq_length']} · {gc} · {p['lora']}"
        if p["published_gib"]:
            verdict = f"{pred / p['published_gib']:.2f}× the published figure"
        else:
            verdict = f"fits in {card} GB: {'yes' if out['fits'] else 'NO'}"
        lines.append(f"| {p['source']} | {p['what']} | {p['published']} | {setting} | {pred:.1f} | {verdict} |")
    return "\n".join(lines)


def replace_block(text: str, markers: tuple[str, str], body: str) -> str:
    start, end = markers
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body + "\n" + text[j:]


def block(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    return text[text.index(start) + len(start): text.index(end)].strip("\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    m, c = matrix(), comparison()
    if "--write" in sys.argv:
        text = README.read_text()
        text = replace_block(replace_block(text, MATRIX_MARKERS, m), COMPARISON_MARKERS, c)
        README.write_text(text)
    else:
        print(m, "", c, sep="\n")
