"""The throughput benchmark runs end to end (a smoke run on the tiny model) and its three variants did the
same work: the same real tokens, from the same records, in the same number of optimizer steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_benchmark_smoke_run_compares_the_same_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--models", "tiny", "--steps", "2",
         "--records", "24", "--work", str(tmp_path), "--no-startup"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["a", "b", "c", "f"]
    assert len({r["real_tokens"] for r in rows}) == 1  # the same samples, counted the same way
    assert all(r["tokens_per_s"] > 0 and r["eval_loss"] > 0 for r in rows)
    # never an impossible MFU, however busy the machine was when the peak was measured
    assert all(0 < r["mfu"] <= 1 if r["mfu"] is not None else r["peak_uncertain"] for r in rows)
    last = proc.stdout.strip().splitlines()[-4:]
    assert last[0].startswith("tiny: (b) trl defaults / (a) textbook:") and "x real tokens/s" in last[0]
    assert last[1].startswith("tiny: (c) w/ fused head / (a) textbook:")
    assert last[2].startswith("tiny: (c) loraforge / (a) textbook:")
    assert last[3].startswith("tiny: (c) loraforge / (b) trl defaults:")


@pytest.mark.slow
def test_qlora_benchmark_smoke_run(tmp_path):
    """benchmarks/qlora.py runs LoRA, QLoRA and 8-bit on the same records; the 4-bit base is the smallest."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "qlora.py"), "--models", "tiny", "--steps", "1",
         "--records", "16", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["quantization"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"none", "4bit", "8bit"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 for r in rows.values())
    assert rows["4bit"]["base_bytes"] < rows["8bit"]["base_bytes"] < rows["none"]["base_bytes"]
    assert proc.stdout.strip().splitlines()[-2].startswith("tiny: 4bit / none:")


@pytest.mark.slow
def test_preference_benchmark_smoke_run_compares_the_same_work(tmp_path, tiny_model_dir):
    """benchmarks/preference.py: trl's DPOTrainer with its defaults, loraforge's DPO and loraforge with the
    precomputed reference train on the same pairs, as often, and their tokens are counted alike."""
    import math

    steps, pairs = 2, 8  # two epochs of 8 pairs at a global batch of 8
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "preference.py"), "--models", str(tiny_model_dir), "--steps",
         str(steps), "--pairs", str(pairs), "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["b", "c", "p"]
    assert {r["pairs"] for r in rows} == {steps * 8}  # every training batch counted
    assert len({r["pairs_seen_digest"] for r in rows}) == 1  # the same pairs (by prompt tokens), as often
    assert len({r["real_tokens"] for r in rows}) == 1
    b, c, p = rows
    assert c["own_tokens"] == p["own_tokens"] == c["real_tokens"]  # loraforge's batches hold what was counted
    assert b["own_tokens"] == b["real_tokens"] + 2 * b["pairs"]  # trl keeps the newline after each answer's <|im_end|>
    for r in rows:
        assert r["steps"] == steps and len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # fresh adapter: the policy is the reference
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
    assert p["precompute_s"] > 0 and b["precompute_s"] == c["precompute_s"] == 0
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith(f"{tiny_model_dir.name}: (c) loraforge / (b) trl defaults:") and "x real tokens/s" in last[0]
    assert last[1].startswith(f"{tiny_model_dir.name}: (c) + precompute_reference / (b) trl defaults:")
