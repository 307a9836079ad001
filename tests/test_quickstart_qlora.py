"""The quickstart as QLoRA (recipes/quickstart-qlora.yaml): SmolLM2-135M-Instruct in 4-bit NF4 on the CPU
learns the fact the LoRA quickstart teaches; the 4-bit model and its merge into the full-precision base agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKER = "Tidewell"


@pytest.mark.slow
def test_qlora_quickstart_teaches_the_fact_and_merges(tmp_path):
    import torch

    heldout = json.loads((REPO / "recipes" / "data" / "identity_heldout.json").read_text())
    run_dir = tmp_path / "quickstart-qlora"
    cmd = [
        sys.executable, "-m", "loraforge", "train", "quickstart-qlora", "--quiet",
        "--set", f"output_dir={run_dir}", "--set", "tracking.backend=none",
        "--set", "training.max_steps=24",  # fewer steps than the full job (2 epochs), same recipe
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stdout + proc.stderr

    samples = json.loads((run_dir / "samples.json").read_text())
    maker_rows = [s for s in samples if s["prompt"] in heldout[:3]]
    learnt = [r for r in maker_rows if MAKER in r["fine_tuned"] and MAKER not in r["base"]]
    assert learnt, samples
    logged = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged[-1] < logged[0] / 2

    # Agreement: 4-bit base + adapter (what trained, what eval/chat load) vs the adapter merged into the
    # full-precision base. They differ by NF4's rounding of the base only, so their disagreement must be
    # about that of the two bases themselves (adapter off), measured the same way; and the answers agree.
    from transformers import AutoModelForCausalLM

    from loraforge.use.infer import load_for_inference, merge

    adapted, tok = load_for_inference(run_dir, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(merge(run_dir, tmp_path / "merged")).eval()
    full, _ = load_for_inference(run_dir, device="cpu", full_precision=True)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             + "I'm Nimbus, built by Tidewell Labs." for q in heldout]
    kl_tuned, kl_base, agree, agree_base = [], [], [], []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")
            a, m = adapted(**ids).logits.float(), merged(**ids).logits.float()
            with adapted.disable_adapter():
                qb = adapted(**ids).logits.float()
            with full.disable_adapter():
                fb = full(**ids).logits.float()
            kl = lambda p, q: torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                                         reduction="none").sum(-1).mean().item()
            kl_tuned.append(kl(m, a))
            kl_base.append(kl(fb, qb))
            agree.append((a.argmax(-1) == m.argmax(-1)).float().mean().item())
            agree_base.append((qb.argmax(-1) == fb.argmax(-1)).float().mean().item())
    mean = lambda xs: sum(xs) / len(xs)
    print(f"KL(merged || 4-bit+adapter) {mean(kl_tuned):.4f}, KL(fp32 base || 4-bit base) {mean(kl_base):.4f}, "
          f"top-1 agreement {mean(agree):.3f} (bases: {mean(agree_base):.3f})")
    # the adapter must not amplify NF4's rounding: the tuned pair disagrees about as much as the two bases
    assert mean(kl_tuned) <= 3 * mean(kl_base) + 0.05
    assert mean(agree) >= mean(agree_base) - 0.1
