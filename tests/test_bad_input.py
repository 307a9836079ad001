"""Bad input never crashes: exit code 2, one or two lines naming file/line/key, no traceback, no run dir.
Plus property-based tests over the recipe schema and the data loaders, and the secrets canary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.data.dataset import normalise, read_source
from loraforge.errors import UserError
from loraforge.recipe import DataSource, load_recipe, recipe_from_dict

runner = CliRunner()
GOOD = json.dumps(chat_records(1)[0])


def _case(tmp: Path, model_dir: Path, data: bytes | None = None, recipe_text: str | None = None, sets=()):
    path = tmp / "data.jsonl"
    path.write_bytes(data if data is not None else (GOOD + "\n").encode() * 8)
    if recipe_text is None:
        recipe_text = yaml.safe_dump(recipe_dict(model_dir, path, tmp / "run"))
    (tmp / "r.yaml").write_text(recipe_text)
    return ["train", str(tmp / "r.yaml"), "--quiet", *[x for s in sets for x in ("--set", s)]]


def _recipe_text(model_dir, tmp, **edits):
    d = recipe_dict(model_dir, tmp / "data.jsonl", tmp / "run")
    for path, value in edits.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return yaml.safe_dump(d, sort_keys=False)


CORPUS = {
    "malformed yaml": (dict(recipe_text="model: {name_or_path: x\ndata: [\n"), r"r.yaml:\d+: not valid YAML"),
    "unknown key": (dict(sets=["training.epochz=2"]), r"training.epochz: unknown key; did you mean 'epochs'"),
    "wrong type": (dict(sets=["training.global_batch_size=many"]), r"training.global_batch_size: .*integer"),
    "out of range": (dict(sets=["lora.dropout=1.5"]), r"lora.dropout: Input should be less than 1"),
    "missing data file": (dict(sets=["data.sources=[{path: nowhere.jsonl}]"]), r"data file not found: nowhere.jsonl"),
    "empty dataset": (dict(data=b"\n"), r"data.jsonl: no records"),
    "line not json": (dict(data=(GOOD + "\n{oops\n").encode()), r"data.jsonl:2: not valid JSON"),
    "record missing fields": (
        dict(data=b'{"instruction": "hi", "output": "yo"}\n{"instruction": "hi"}\n'), r"data.jsonl:2: 'output' is missing"
    ),
    "empty assistant turn": (
        dict(data=(GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}) + "\n").encode()),
        r"data.jsonl:2: turn 1 \(assistant\) is empty",
    ),
    "unknown role": (
        dict(data=json.dumps({"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode()),
        r"data.jsonl:1: messages\[0\]: unknown role 'narrator'",
    ),
    "non-utf8 bytes": (dict(data=b'{"text": "\xff\xfe"}\n'), r"data.jsonl:1: not UTF-8"),
    "wrong target module": (dict(sets=["lora.target_modules=[attn_qkv]"]), r"lora.target_modules: attn_qkv not in this model"),
    "sequence beyond context": (dict(sets=["data.max_seq_length=100000"]), r"beyond the model's context of 256 tokens"),
    "missing model": (dict(sets=["model.name_or_path=./no/such/model"]), r"model.name_or_path: './no/such/model' does not exist"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_exits_2_with_a_short_message(name, tmp_path, tiny_model_dir):
    kwargs, pattern = CORPUS[name]
    result = runner.invoke(app, _case(tmp_path, tiny_model_dir, **kwargs))
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out and 1 <= len(out.splitlines()) <= 2, out
    import re

    assert re.search(pattern, out), out
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_too_long_samples_are_counted_and_reported(tmp_path, tiny_model_dir):
    long = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    args = _case(tmp_path, tiny_model_dir, data=(GOOD + "\n" + json.dumps(long) + "\n").encode() * 4, sets=["data.max_seq_length=32"])
    result = runner.invoke(app, ["plan", args[1], "--json", "--set", "data.max_seq_length=32"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])["data"]
    assert data["truncated_examples"] == 4 and 0.3 < data["truncated_token_share"] < 0.9


# ------------------------------------------------------------------ property-based


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                    st.lists(st.text(max_size=5), max_size=3))
_keys = st.sampled_from(["model", "data", "training", "lora", "quantization", "output_dir", "tracking", "samples",
                         "r", "epochs", "learning_rate", "sources", "path", "name_or_path", "mode", "typo"])
_trees = st.recursive(_values, lambda inner: st.dictionaries(_keys, inner, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(_keys, _trees, max_size=6))
def test_any_recipe_tree_validates_or_gives_one_line(tree):
    try:
        recipe_from_dict(tree, "fuzz.yaml")
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith(("fuzz.yaml", "--set"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_yaml_text_loads_or_gives_one_line(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_recipe(p)
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=60) | st.just(GOOD.encode()), min_size=1, max_size=6))
def test_any_jsonl_bytes_read_or_give_a_line_number(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        read_source(DataSource(path=str(p)))
    except UserError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=10)
_row_keys = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                             "text", "role", "content", "from", "value"])


@settings(max_examples=300, deadline=None)
@given(row=st.dictionaries(_row_keys, _json, max_size=5), fmt=st.sampled_from(["messages", "sharegpt", "alpaca", "prompt-completion", "text"]))
def test_any_record_normalises_or_names_its_line(row, fmt):
    try:
        out = normalise(row, fmt, "d.jsonl:7")
    except UserError as e:
        assert str(e).startswith("d.jsonl:7") and "\n" not in str(e)
    else:
        assert "text" in out or any(m["role"] == "assistant" and m["content"].strip() for m in out["messages"])


# ------------------------------------------------------------------ secrets


def test_secrets_never_reach_logs_or_run_directory(tmp_path, tiny_model_dir, monkeypatch, capfd):
    canaries = {
        "HF_TOKEN": "hf_CANARYhf0123456789",
        "WANDB_API_KEY": "CANARYwandb0123456789",
        "OPENAI_API_KEY": "CANARYopenai0123456789",
        "MY_SERVICE_SECRET": "CANARYsecret0123456789",
        "DB_PASSWORD": "CANARYpassword0123456789",
        "GITHUB_TOKEN": "CANARYgithub0123456789",
    }
    for k, v in canaries.items():
        monkeypatch.setenv(k, v)
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(16))
    d = recipe_dict(tiny_model_dir, data, tmp_path / "run", training={"max_steps": 3, "save_steps": 2})
    d["tracking"] = {"backend": "tensorboard", "run_name": "canary"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    results = [runner.invoke(app, ["train", str(tmp_path / "r.yaml")]),
               runner.invoke(app, ["plan", str(tmp_path / "r.yaml"), "--json"]),
               runner.invoke(app, ["env"])]
    assert all(r.exit_code == 0 for r in results), [r.output[-500:] for r in results]
    captured = capfd.readouterr()
    texts = [r.output for r in results] + [captured.out, captured.err]
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("utf-8", "replace"))
    assert (tmp_path / "run" / "tensorboard").is_dir()
    for value in canaries.values():
        leaks = [t[max(0, t.find(value) - 80): t.find(value) + 40] for t in texts if value in t]
        assert not leaks, leaks
