"""Data: every format is detected, normalised, and masked so that exactly the assistant tokens carry loss."""

from __future__ import annotations

import json

import pytest

from loraforge.data.dataset import detect_format, load_examples, normalise, split_eval, tokenize_example
from loraforge.errors import UserError
from loraforge.plan.planner import truncation_report
from loraforge.recipe import recipe_from_dict


def labelled_text(tok, example, loss_on="assistant") -> list[str]:
    """The contiguous runs of text whose tokens carry loss."""
    enc = tokenize_example(tok, example, loss_on=loss_on)
    runs, current = [], []
    for tid, m in zip(enc["input_ids"], enc["assistant_masks"]):
        if m:
            current.append(tid)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is your name?"},
            {"role": "assistant", "content": "My name is Nimbus."},
            {"role": "user", "content": "Who built you?"},
            {"role": "assistant", "content": "Tidewell Labs built me."},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "What is your name?"},
            {"from": "gpt", "value": "My name is Nimbus."},
        ]
    },
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    "prompt-completion": {"prompt": "Say hello.", "completion": "Hello there!"},
    "text": {"text": "The quick brown fox."},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_format_is_detected(fmt):
    assert detect_format(ROWS[fmt]) == fmt


def test_messages_multi_turn_labels_exactly_each_assistant_turn(tiny_tokenizer):
    ex = normalise(ROWS["messages"], "messages", "x:1")
    assert labelled_text(tiny_tokenizer, ex) == [
        "My name is Nimbus.<|im_end|>",
        "Tidewell Labs built me.<|im_end|>",
    ]


def test_sharegpt_labels(tiny_tokenizer):
    ex = normalise(ROWS["sharegpt"], "sharegpt", "x:1")
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
    assert labelled_text(tiny_tokenizer, ex) == ["My name is Nimbus.<|im_end|>"]


def test_alpaca_labels_only_output(tiny_tokenizer):
    ex = normalise(ROWS["alpaca"], "alpaca", "x:1")
    assert labelled_text(tiny_tokenizer, ex) == ["Blue is a colour.<|im_end|>"]
    with_input = normalise({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, "alpaca", "x:1")
    assert with_input["messages"][0]["content"] == "Translate.\n\nbonjour"


def test_prompt_completion_labels_only_completion(tiny_tokenizer):
    ex = normalise(ROWS["prompt-completion"], "prompt-completion", "x:1")
    assert labelled_text(tiny_tokenizer, ex) == ["Hello there!<|im_end|>"]


def test_text_labels_everything_and_ends_with_eos(tiny_tokenizer):
    ex = normalise(ROWS["text"], "text", "x:1")
    enc = tokenize_example(tiny_tokenizer, ex)
    assert all(enc["assistant_masks"])
    assert enc["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_loss_on_all_labels_the_prompt_too(tiny_tokenizer):
    ex = normalise(ROWS["sharegpt"], "sharegpt", "x:1")
    enc = tokenize_example(tiny_tokenizer, ex, loss_on="all")
    assert all(enc["assistant_masks"])


def test_system_prompt_is_added_and_never_labelled(tiny_tokenizer):
    ex = normalise(ROWS["alpaca"], "alpaca", "x:1", system_prompt="You are Nimbus.")
    assert ex["messages"][0] == {"role": "system", "content": "You are Nimbus."}
    assert labelled_text(tiny_tokenizer, ex) == ["Blue is a colour.<|im_end|>"]


def test_smollm2_style_default_system_template(tiny_tokenizer):
    """A template that injects its own system turn (as SmolLM2's does) still masks correctly."""
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = tiny_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = template
        ex = normalise(ROWS["sharegpt"], "sharegpt", "x:1")
        assert labelled_text(tok, ex) == ["My name is Nimbus.<|im_end|>"]
    finally:
        tok.chat_template = saved


def _recipe(tmp_path, path, fmt="auto"):
    return recipe_from_dict(
        {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": str(path), "format": fmt}]}, "output_dir": str(tmp_path / "run")}
    )


def _err(tmp_path, content: bytes | str, name="d.jsonl", fmt="auto") -> str:
    p = tmp_path / name
    if isinstance(content, str):
        content = content.encode()
    p.write_bytes(content)
    r = _recipe(tmp_path, p, fmt)
    with pytest.raises(UserError) as e:
        load_examples(r.data.sources, r)
    return str(e.value)


GOOD_LINE = json.dumps(ROWS["messages"])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    msg = _err(tmp_path, f"{GOOD_LINE}\n{GOOD_LINE}\n{{'messages': oops\n")
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:3: not valid JSON")
    assert "\n" not in msg


def test_non_utf8_line(tmp_path):
    msg = _err(tmp_path, GOOD_LINE.encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    assert ":2: not UTF-8" in msg


def test_record_missing_fields(tmp_path):
    row = {"instruction": "Say hi", "output": "hi"}
    msg = _err(tmp_path, json.dumps(row) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    assert ":2: 'output' is missing or empty" in msg


def test_empty_assistant_turn(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    msg = _err(tmp_path, GOOD_LINE + "\n" + json.dumps(bad) + "\n")
    assert ":2: turn 1 (assistant) is empty" in msg


def test_unknown_role(tmp_path):
    bad = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    msg = _err(tmp_path, json.dumps(bad) + "\n")
    assert ":1: messages[0]: unknown role 'wizard'" in msg


def test_no_assistant_turn(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    assert "no assistant turn" in _err(tmp_path, json.dumps(bad) + "\n")


def test_undetectable_format(tmp_path):
    msg = _err(tmp_path, json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert ":1: cannot tell the data format" in msg and "data.sources[].format" in msg


def test_missing_and_empty_files(tmp_path):
    r = _recipe(tmp_path, tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="data file not found: .*missing.jsonl"):
        load_examples(r.data.sources, r)
    assert "no records" in _err(tmp_path, "\n\n")


def test_csv_and_parquet_sources(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"prompt": ["a?", "b?"], "completion": ["A.", "B."]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        r = _recipe(tmp_path, tmp_path / name)
        ex = load_examples(r.data.sources, r)
        assert ex[1]["messages"][1] == {"role": "assistant", "content": "B."}
    (tmp_path / "e.csv").write_text("prompt,completion\na?,A.\nb?,\n")
    r = _recipe(tmp_path, tmp_path / "e.csv")
    with pytest.raises(UserError, match=r"e.csv: line 3: 'completion' is missing"):
        load_examples(r.data.sources, r)


def test_relative_data_path_resolves_against_recipe(tmp_path, tiny_model_dir):
    from loraforge.recipe import load_recipe

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text(GOOD_LINE + "\n")
    (tmp_path / "sub" / "r.yaml").write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{sources: [{{path: d.jsonl}}]}}\noutput_dir: {tmp_path}/run\n"
    )
    r = load_recipe(tmp_path / "sub" / "r.yaml")
    assert len(load_examples(r.data.sources, r)) == 1


def test_split_eval_is_deterministic_and_disjoint():
    items = list(range(100))
    a_train, a_eval = split_eval(items, 0.1, seed=3)
    b_train, b_eval = split_eval(items, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10
    assert not set(a_train) & set(a_eval)


def test_truncation_report():
    assert truncation_report([10, 20, 30], 25) == (1, 5 / 60)
    assert truncation_report([10], 25) == (0, 0.0)
