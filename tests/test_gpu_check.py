"""`loraforge check-gpu` on the CPU: argument parsing, which cases fit which card, the table writer and its JSON,
and the measuring code's model build + steps on a tiny architecture (the CUDA run itself needs a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.errors import UserError
from loraforge.run import gpu_check as gc

FIXTURES = Path(__file__).parent / "fixtures" / "configs"


def _dry(tmp_path, *argv):
    args = gc.parse_args(["--dry-run", "--out", str(tmp_path), *argv])
    report = gc.check(args, log=lambda *_: None)
    return report, json.loads((tmp_path / "gpu_check.json").read_text()), (tmp_path / "gpu_check.md").read_text()


def _by(rows, case, head=None):
    return [r for r in rows if r["case"] == case and (head is None or r["loss_head"] == head)]


def test_configs_are_the_published_ones():
    for name, cfg in gc.CONFIGS.items():
        published = json.loads((FIXTURES / name / "config.json").read_text())
        assert {k: published[k] for k in cfg} == cfg, name


def test_parse_args_defaults_and_errors():
    a = gc.parse_args([])
    assert (a.dry_run, a.card, a.steps, a.out) == (False, None, 3, Path("gpu_check"))
    a = gc.parse_args(["--dry-run", "--card", "a100-80gb", "--steps", "5", "--cases", "qwen0.5b-lora"])
    assert (a.dry_run, a.card, a.steps) == (True, "a100-80gb", 5)
    with pytest.raises(SystemExit):
        gc.parse_args(["--steps", "0"])
    with pytest.raises(UserError, match="--cases: unknown nope"):
        gc.select_cases("qwen0.5b-lora,nope")
    with pytest.raises(UserError, match="--card rtx9999: not a GPU profile; known: rtx3060-12gb"):
        gc.card_hardware("rtx9999")
    with pytest.raises(UserError, match="--card cpu: not a GPU profile"):
        gc.card_hardware("cpu")


def test_small_card_runs_only_what_fits(tmp_path):
    report, js, md = _dry(tmp_path, "--card", "rtx3060-12gb")
    rows = js["rows"]
    lora8b = _by(rows, "llama3-8b-lora")[0]
    assert lora8b["predicted_peak_gib"] > lora8b["budget_gib"] == 11.76
    assert lora8b["status"].startswith("does not fit")
    small = _by(rows, "qwen0.5b-lora")[0]
    assert small["status"] == "run" and small["predicted_peak_gib"] <= 11.76
    assert small["micro_batch"] * small["grad_accum"] == 16  # the global batch is kept
    assert small["predicted_plus_1_gib"] > small["predicted_peak_gib"]
    assert small["micro_batch_limited_by"] == "memory" and small["micro_batch"] < 16
    # QLoRA 8B fits the plan, but the random 16-bit base this check builds does not fit the card
    assert all(r["status"].startswith("skipped: building the random 16-bit base") for r in _by(rows, "llama3-8b-qlora", "fused"))


def test_big_card_runs_every_case_and_the_head_comparison(tmp_path):
    report, js, md = _dry(tmp_path, "--card", "h100-80gb")
    rows = js["rows"]
    assert {r["case"] for r in rows} == {c.name for c in gc.CASES}
    assert all(r["status"] == "run" for r in rows)
    heads = {r["loss_head"] for r in _by(rows, "qwen0.5b-lora")}
    assert heads == {"fused", "plain"}
    fused, plain = _by(rows, "qwen0.5b-lora", "fused")[0], _by(rows, "qwen0.5b-lora", "plain")[0]
    assert plain["micro_batch"] == fused["micro_batch"]  # same setting, so tokens/s compare
    assert plain["predicted_peak_gib"] > fused["predicted_peak_gib"]  # the plain head holds the logits
    assert fused["micro_batch"] == 16 and fused["micro_batch_limited_by"] == "global batch"
    long = _by(rows, "llama3-8b-lora-8k")[0]
    assert long["seq_len"] == 8192 and long["gradient_checkpointing"] is True
    assert _by(rows, "qwen7b-qlora-gc")[0]["gradient_checkpointing"] is True  # fixed by the case


def test_more_memory_drops_checkpointing_or_plans_a_larger_micro_batch(tmp_path):
    small = gc.plan_rows(gc.card_hardware("rtx4090-24gb"))
    big = gc.plan_rows(gc.card_hardware("a100-80gb"))
    for s, b in zip(small, big):
        assert (s["case"], s["loss_head"]) == (b["case"], b["loss_head"])
        if s["gradient_checkpointing"] == b["gradient_checkpointing"]:
            assert b["micro_batch"] >= s["micro_batch"]
        else:  # the solver prefers no checkpointing to a larger micro-batch
            assert s["gradient_checkpointing"] and not b["gradient_checkpointing"]


def test_missing_packages_are_reported_as_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "has_package", lambda name: name not in ("datasets", "bitsandbytes"))
    rows = gc.plan_rows(gc.card_hardware("h100-80gb"))
    first = _by(rows, "qwen0.5b-lora")
    assert [r["loss_head"] for r in first] == ["plain", "fused"]  # without trl the plain head is the default
    assert first[0]["status"] == "run" and first[1]["status"] == "skipped: datasets missing"  # trl's fused head
    assert all(r["status"] == "skipped: bitsandbytes missing" for r in rows if r["method"] == "QLoRA")


def test_table_writer_markdown_and_json_schema(tmp_path):
    report, js, md = _dry(tmp_path, "--card", "a100-80gb", "--cases", "qwen0.5b-lora,llama3-8b-lora")
    assert js["schema"] == gc.SCHEMA and js["dry_run"] is True
    assert js["card"] == {"name": "NVIDIA A100-SXM4-80GB", "total_gib": 79.15, "capability": [8, 0],
                          "profile": "a100-80gb"}
    assert js["datasheet_peak_tflops"] == 312.0 and js["matmul_peak_tflops"] is None
    assert js["columns"] == [k for k, _ in gc.COLUMNS]
    for row in js["rows"]:
        assert set(js["columns"]) <= set(row)
        assert all(row[k] is None for k in gc.MEASURED)  # a dry run measures nothing
        assert isinstance(row["predicted_peak_gib"], float) and row["precision"] == "bf16"
    lines = md.splitlines()
    assert lines[0].startswith("### loraforge check-gpu: NVIDIA A100-SXM4-80GB (79.15 GiB)") and "dry run" in lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(js["rows"])
    assert all(ln.count("|") == len(gc.COLUMNS) + 1 for ln in table)
    # measured values render: GiB with 2 decimals, MFU as a percentage
    row = dict(js["rows"][0], max_allocated_gib=12.345, mfu_measured_peak=0.4321, tokens_per_s=12345.6)
    text = gc.markdown_table(dict(js, rows=[row], dry_run=False, matmul_peak_tflops=280.0, side_by_side=None))
    assert "| 12.35 |" in text and "| 43.2% |" in text and "| 12,346 |" in text
    assert "bf16 matmul peak measured: 280 TFLOP/s" in text and "dry run" not in text


def test_cli_check_gpu_dry_run(tmp_path):
    from typer.testing import CliRunner

    from loraforge.cli import app

    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["check-gpu", "--dry-run", "--card", "rtx4090-24gb", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "gpu_check.json").read_text())["card"]["profile"] == "rtx4090-24gb"
    res = CliRunner().invoke(app, ["check-gpu", "--dry-run", "--card", "nope", "--out", str(tmp_path / "u")])
    assert res.exit_code == 2 and "--card nope" in res.output
    assert not (tmp_path / "u").exists()  # nothing half-written


TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
        "max_position_embeddings": 256, "tie_word_embeddings": True}


@pytest.mark.parametrize("quant,head", [("none", "plain"), ("none", "fused"), ("4bit", "plain")])
def test_measuring_code_trains_a_tiny_model_on_the_cpu(quant, head):
    """The model the GPU run builds (random base, QLoRA's 4-bit swap, peft LoRA, the loss head) trains: only LoRA
    weights train, and the loss of a fixed batch goes down over AdamW steps (4-bit: the adapters get gradients;
    bitsandbytes' CPU kernels are too slow for more here)."""
    import torch

    if head == "fused":
        pytest.importorskip("trl")
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    case = gc.Case("tiny", "tiny", quant, 32, 2)
    row = {"precision": "fp32", "gradient_checkpointing": quant == "4bit"}
    model = gc.build_model(case, row, head, device="cpu", config_dict=TINY)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    ids = torch.randint(0, 256, (2, 32))
    if quant == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        gc._loss(model, ids, None, head).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)  # B starts at 0
        return
    opt = torch.optim.AdamW([p for _, p in trainable], lr=5e-2)
    with torch.no_grad():
        first = float(gc._loss(model, ids, None, head))
    for _ in range(4):
        gc._loss(model, ids, None, head).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert float(gc._loss(model, ids, None, head)) < first
    wall, last = gc.train_steps(model, opt, 2, 1, 32, 256, 1, head, torch.float32, padded=True, device="cpu")
    assert wall > 0 and last == last  # a padded micro-batch runs too (finite loss)


BLOCKER = """
import importlib.machinery, runpy, sys
BLOCK = {"pydantic", "typer", "rich", "trl", "bitsandbytes", "datasets", "deepspeed"}
found = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):  # as if not installed: imports fail, find_spec says None
    return None if name.split(".")[0] in BLOCK else found(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
import loraforge.run.gpu_check, loraforge.model.lmhead, loraforge.model.quant  # what the measuring code imports
assert not any(m.split(".")[0] in BLOCK for m in sys.modules), sorted(m for m in sys.modules if m.split(".")[0] in BLOCK)
sys.argv = ["gpu_check.py"] + sys.argv[1:]
runpy.run_path(%r, run_name="__main__")
"""


def test_runs_on_the_base_image_without_pydantic_trl_bitsandbytes(tmp_path):
    """The air-gapped image has torch, transformers, accelerate and peft only: the script from a checkout (no
    install) plans there, with QLoRA and the fused head reported as skipped."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    code = BLOCKER % str(script)
    res = subprocess.run([sys.executable, "-c", code, "--dry-run", "--card", "a100-80gb", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    status = {(r["case"], r["loss_head"]): r["status"] for r in rows}
    assert status[("qwen0.5b-lora", "plain")] == "run"
    assert status[("qwen0.5b-lora", "fused")] == "skipped: trl missing"
    assert status[("llama3-8b-qlora", "plain")] == "skipped: bitsandbytes missing"
    side = json.loads((tmp_path / "gpu_check.json").read_text())["side_by_side"]
    assert side["status"] == "skipped: datasets, trl, pydantic, typer, rich missing"  # its three trainers need them
