"""The `loraforge` command on a trained tiny run: plan, generate (adapter and merged agree), chat, merge."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loraforge.cli import app

runner = CliRunner()


def test_plan_json_shows_plan_and_every_default(make_recipe):
    result = runner.invoke(app, ["plan", str(make_recipe()), "--json", "--set", "training.global_batch_size=8"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["global_batch_size"] == 8
    assert out["micro_batch_size"] * out["gradient_accumulation_steps"] * out["world_size"] == 8
    assert out["recipe"]["model"]["trust_remote_code"] is False
    assert out["recipe"]["lora"]["use_dora"] is False
    assert out["data"]["train_examples"] == 32


def test_train_generate_merge_chat(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 15})
    trained = runner.invoke(app, ["train", str(recipe), "--quiet"])
    assert trained.exit_code == 0, trained.output
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert not (run_dir / "training_args.bin").exists()

    prompt = ["--prompt", "Who built you?", "--max-new-tokens", "8"]
    adapter_out = runner.invoke(app, ["generate", str(run_dir), *prompt])
    assert adapter_out.exit_code == 0, adapter_out.output
    merged = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    merged_out = runner.invoke(app, ["generate", str(tmp_path / "merged"), *prompt])
    assert merged_out.exit_code == 0
    answer = adapter_out.output.strip().splitlines()[-1]
    assert answer and merged_out.output.strip().splitlines()[-1] == answer

    chat = runner.invoke(app, ["chat", str(run_dir), "--max-new-tokens", "8"], input="Who built you?\n/reset\nhi\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("bot> ") == 2

    again = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert again.exit_code == 2 and "not empty" in again.output


def test_generate_on_a_non_run_directory_is_a_user_error(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2 and "neither a run directory" in result.output
