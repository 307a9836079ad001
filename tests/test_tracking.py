"""The run's story: W&B offline runs and TensorBoard events hold the loss curve; progress bar; summary."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl

from loraforge.recipe import load_recipe
from loraforge.run.session import run


def _metrics_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _wandb_records(path: str):
    """Records of a .wandb file (a LevelDB-style log of protobufs: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += (block - pos % block) % block
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            chunk_full = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        else:
            chunk_full, buf = buf + chunk, b""
        record = pb.Record()
        record.ParseFromString(chunk_full)
        yield record


@pytest.mark.slow
def test_wandb_offline_run_lands_in_run_dir_with_the_loss_curve(tmp_path, tiny_model_dir):
    pytest.importorskip("wandb")
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(32))
    d = recipe_dict(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 6})
    d["tracking"] = {"backend": "wandb", "project": "loraforge-tests", "tags": ["ci"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}  # no key, no netrc: offline
    proc = subprocess.run([sys.executable, "-m", "loraforge", "train", str(tmp_path / "r.yaml"), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb_run_id"]
    files = glob.glob(str(tmp_path / "run" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1, os.listdir(tmp_path / "run" / "wandb")
    history, config = [], {}
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                history.append((items["train/global_step"], items["train/loss"], items.get("train/tokens_per_second")))
        elif kind == "config":
            config.update({i.key: i.value_json for i in r.config.update})
    assert [(s, round(loss, 4)) for s, loss, _ in history] == [(s, round(v, 4)) for s, v in _metrics_losses(tmp_path / "run")]
    assert all(tps and tps > 0 for *_, tps in history[1:])
    tracked = json.loads(config["loraforge"])
    assert tracked["recipe"]["tracking"]["backend"] == "wandb" and tracked["plan"]["global_batch_size"] == 4
    assert "torch" in tracked["versions"]


def test_wandb_run_id_is_kept_for_resumed_and_requeued_jobs(tmp_path, monkeypatch):
    from loraforge.run import tracking

    # configure() sets process environment variables: give it a copy, so that no other test sees them
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    monkeypatch.setenv("HOME", str(tmp_path))
    r = load_recipe_stub(tmp_path)
    assert tracking.configure(r, tmp_path / "run") == ["wandb"]
    first = os.environ["WANDB_RUN_ID"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_RESUME"] == "allow"
    assert os.environ["WANDB_DIR"] == str(tmp_path / "run")
    monkeypatch.delenv("WANDB_RUN_ID")
    tracking.configure(r, tmp_path / "run")  # the same command again (a resume, a requeue)
    assert os.environ["WANDB_RUN_ID"] == first
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    tracking.configure(r, tmp_path / "run2")
    assert "WANDB_MODE" not in os.environ  # logged in: online


def load_recipe_stub(tmp_path):
    from loraforge.recipe import recipe_from_dict

    return recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]},
                             "output_dir": str(tmp_path / "run"), "tracking": {"backend": "wandb"}})


def test_tensorboard_events_hold_the_loss_curve_and_progress_bar_shows(tmp_path, make_recipe, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(make_recipe(training={"max_steps": 6}, tracking={"backend": "tensorboard"}))
    result = run(recipe, quiet=False)
    err = capfd.readouterr().err
    assert "training" in err and "loss=" in err and "tok/s=" in err  # the progress bar, with its postfix
    events = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
    scalars = [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")]
    assert scalars == [(s, round(v, 4)) for s, v in _metrics_losses(result.run_dir)]
    assert len(events.Scalars("train/tokens_per_second")) >= 5
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    assert summary["tokens_seen"] > 0 and summary["tokens_per_second"] > 0 and summary["peak_memory_gib"] > 0
