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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "base vs fine-tuned" in proc.stdout

    samples = json.loads((run_dir / "samples.json").read_text())
    maker_rows = [s for s in samples if s["prompt"] in heldout[:3]]
    assert maker_rows, "the quickstart must ask held-out questions about the maker"
    for row in samples:
        assert row["prompt"].strip().lower() not in train_users  # really unseen
    learnt = [r for r in maker_rows if MAKER in r["fine_tuned"] and MAKER not in r["base"]]
    assert learnt, samples
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] / 2
