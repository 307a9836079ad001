"""The embedded default job on the real SmolLM2-135M-Instruct: it learns a fact the base model lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKER = "Tidewell"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The quickstart, shortened: 24 optimizer steps instead of its 2 epochs, same recipe. Returns (run directory,
    its stdout); the DPO stage below starts from it, as the demo does."""
    run_dir = tmp_path_factory.mktemp("qs") / "quickstart"
    cmd = [
        sys.executable, "-m", "loraforge", "quickstart", "--quiet",
        "--set", f"output_dir={run_dir}",
        "--set", "training.max_steps=24",  # fewer steps than the full job (2 epochs), same recipe
    ]
    env = os.environ | {"COLUMNS": "200", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.mark.slow
def test_quickstart_teaches_a_fact_seen_in_answers_to_unseen_questions(sft_run):
    heldout = json.loads((REPO / "recipes" / "data" / "identity_heldout.json").read_text())
    train_users = {
        json.loads(line)["messages"][0]["content"].strip().lower()
        for line in (REPO / "recipes" / "data" / "identity.jsonl").read_text().splitlines()
    }
    run_dir, stdout = sft_run
    assert "base vs fine-tuned" in stdout and "throughput" in stdout and "loraforge export" in stdout

    samples = json.loads((run_dir / "samples.json").read_text())
    maker_rows = [s for s in samples if s["prompt"] in heldout[:3]]
    assert maker_rows, "the quickstart must ask held-out questions about the maker"
    for row in samples:
        assert row["prompt"].strip().lower() not in train_users  # really unseen
    learnt = [r for r in maker_rows if MAKER in r["fine_tuned"] and MAKER not in r["base"]]
    assert learnt, samples
    logged = [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert logged[-1][1] < logged[0][1] / 2

    # The run's story: TensorBoard events and the offline W&B run both hold the loss curve.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_tracking import _wandb_records

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    # TensorBoard keeps float32: equal to the logged float64 within float32's precision, not to its rounding
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb] == [s for s, _ in logged]
    assert [v for _, v in tb] == pytest.approx([v for _, v in logged], rel=1e-6)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in _wandb_records(str(wandb_file)) if r.WhichOneof("record_type") == "history"
    ]
    wandb_losses = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [s for s, _ in wandb_losses] == [s for s, _ in logged]
    assert [v for _, v in wandb_losses] == pytest.approx([v for _, v in logged], rel=1e-6)

    # The model card: base model, data, settings, results, how to load; with its plots.
    card = (run_dir / "README.md").read_text()
    for needle in ("SmolLM2-135M-Instruct", "identity.jsonl", "global batch", "PeftModel.from_pretrained",
                   "plots/loss.png"):
        assert needle in card, needle
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000


DPO_STEPS = 6  # of the full demo's 18 (3 epochs of 42 pairs at a global batch of 8)


@pytest.mark.slow
def test_dpo_after_the_quickstart_teaches_the_preferred_style_on_unseen_prompts(sft_run, tmp_path):
    """The demo's second stage (recipes/quickstart-dpo.yaml), shortened: DPO from the SFT run's adapter on the
    shipped pairs. On the held-out pairs (prompts in no training pair) the chosen answers gain log-probability
    against the rejected ones relative to the SFT model, and the greedy answers to unseen prompts take up the
    chosen style."""
    sft_dir, _ = sft_run
    run_dir = tmp_path / "dpo"
    cmd = [
        sys.executable, "-m", "loraforge", "train", str(REPO / "recipes" / "quickstart-dpo.yaml"), "--quiet",
        "--set", f"model.adapter_from={sft_dir}", "--set", f"output_dir={run_dir}",
        "--set", f"training.max_steps={DPO_STEPS}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                          env=os.environ | {"COLUMNS": "200", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "chosen preferred" in proc.stdout and "start (adapter_from)" in proc.stdout  # the summary says both

    report = json.loads((run_dir / "preference.json").read_text())
    assert report["scored_on"] == "held-out pairs" and report["reference"] == "start adapter (frozen copy)"
    before, after = report["before"], report["after"]
    assert after["mean_logp_margin"] > before["mean_logp_margin"] + 0.1, report
    assert after["chosen_preferred"] >= before["chosen_preferred"] and after["reward_accuracy"] >= 0.8, report

    pair_prompts = {json.loads(line)["prompt"] for line in
                    (REPO / "recipes" / "data" / "concise_pairs.jsonl").read_text().splitlines()}
    samples = json.loads((run_dir / "samples.json").read_text())
    assert samples and all(r["prompt"] not in pair_prompts for r in samples)  # really unseen
    # the visible preference: answers to the unseen prompts open with the chosen style "In short:", the SFT
    # model's never did (measured at these 6 steps: 3 of 6 after, 0 before; the full demo's 18 steps: 6 of 6)
    assert len(report["start_answers"]) == len(samples) == 6
    assert not any(r["start"].startswith("In short:") for r in report["start_answers"]), report["start_answers"]
    styled = [r["fine_tuned"] for r in samples if r["fine_tuned"].startswith("In short:")]
    assert len(styled) >= 2, [r["fine_tuned"] for r in samples]
