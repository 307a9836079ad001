"""Recipes: validation errors name file, line and key; overrides; defaults are explicit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import UserError
from loraforge.recipe import dump_recipe, load_recipe
from loraforge.resources import find_recipe, shipped_dir

GOOD = """\
model:
  name_or_path: some/model
data:
  sources:
    - path: train.jsonl
training:
  learning_rate: 1.0e-4
  global_batch_size: 16
output_dir: runs/x
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def error_of(path, overrides=()):
    with pytest.raises(UserError) as e:
        load_recipe(path, overrides)
    return str(e.value)


def test_good_recipe_fills_every_default(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.training.learning_rate == 1e-4
    assert r.model.trust_remote_code is False
    dumped = yaml.safe_load(dump_recipe(r))
    # every default is written out, not only what the file said
    assert dumped["lora"]["r"] == 16 and dumped["lora"]["target_modules"] == "all-linear"
    assert dumped["training"]["micro_batch_size"] == "auto"
    assert dumped["quantization"]["mode"] == "none"


def test_unknown_key_names_file_line_and_nearest_key(tmp_path):
    p = write(tmp_path, GOOD.replace("  learning_rate:", "  learnin_rate:"))
    msg = error_of(p)
    assert msg.startswith(f"{p}:7: training.learnin_rate: unknown key")
    assert "did you mean 'learning_rate'" in msg
    assert "\n" not in msg


def test_unknown_section_suggests_valid_section(tmp_path):
    msg = error_of(write(tmp_path, GOOD + "trainig:\n  epochs: 2\n"))
    assert ":10: trainig: unknown key; did you mean 'training'?" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    msg = error_of(write(tmp_path, GOOD + "quantization:\n  mode: 3bit\n"))
    assert ":11: quantization.mode:" in msg
    assert "'none', '4bit' or '8bit'" in msg and "3bit" in msg


def test_out_of_range_value(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("global_batch_size: 16", "global_batch_size: 0")))
    assert ":8: training.global_batch_size: Input should be greater than or equal to 1" in msg


def test_wrong_type_value(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("1.0e-4", "fast")))
    assert ":7: training.learning_rate:" in msg and "'fast'" in msg


def test_missing_required_key(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("output_dir: runs/x\n", "")))
    assert "output_dir: required key is missing" in msg


def test_source_needs_exactly_one_origin(tmp_path):
    text = GOOD.replace("    - path: train.jsonl", "    - split: train")
    assert "data.sources.0: give exactly one of 'path'" in error_of(write(tmp_path, text))


def test_malformed_yaml_names_line(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("  global_batch_size: 16", " global_batch_size: [16")))
    assert msg.startswith(f"{write(tmp_path, GOOD.replace('  global_batch_size: 16', ' global_batch_size: [16'))}:")
    assert "not valid YAML" in msg


def test_set_overrides_any_field(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["training.learning_rate=3e-5", "data.max_seq_length=1024", "lora.target_modules=[q_proj, v_proj]"])
    assert r.training.learning_rate == 3e-5
    assert r.data.max_seq_length == 1024
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_set_with_unknown_key_names_set(tmp_path):
    msg = error_of(write(tmp_path, GOOD), ["training.learning_rat=1e-4"])
    assert msg.startswith("--set: training.learning_rat: unknown key; did you mean 'learning_rate'?")


def test_set_with_bad_value_names_set(tmp_path):
    msg = error_of(write(tmp_path, GOOD), ["quantization.mode=16bit"])
    assert msg.startswith("--set: quantization.mode:")


def test_missing_recipe_file(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")


def test_cli_user_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    p = write(tmp_path, GOOD.replace("  learning_rate:", "  learnin_rate:"))
    result = CliRunner().invoke(app, ["plan", str(p)])
    assert result.exit_code == 2
    out = result.output.strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1 and "did you mean 'learning_rate'" in out


def test_shipped_recipes_validate():
    recipes = sorted(shipped_dir("recipes").glob("*.yaml"))
    assert recipes, "no shipped recipes found"
    for p in recipes:
        load_recipe(p)
    assert find_recipe("quickstart") == shipped_dir("recipes") / "quickstart.yaml"
