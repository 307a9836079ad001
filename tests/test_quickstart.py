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


@pytest.mark.slow
def test_quickstart_teaches_a_fact_seen_in_answers_to_unseen_questions(tmp_path):
    heldout = json.loads((REPO / "recipes" / "data" / "identity_heldout.json").read_text())
    train_users = {
        json.loads(line)["messages"][0]["content"].strip().lower()
        for line in (REPO / "recipes" / "data" / "identity.jsonl").read_text().splitlines()
    }
    run_dir = tmp_path / "quickstart"
    cmd = [
        sys.executable, "-m", "loraforge", "quickstart", "--quiet",
        "--set", f"output_dir={run_dir}",
        "--set", "training.max_steps=24",  # fewer steps than the full job (2 epochs), same recipe
    ]
    env = os.environ | {"COLUMNS": "200", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "base vs fine-tuned" in proc.stdout and "throughput" in proc.stdout and "loraforge export" in proc.stdout

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
