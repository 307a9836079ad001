"""The trainer on a tiny random model: loss goes down, the run directory is complete, results reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHATS, chat_records

from loraforge.errors import UserError
from loraforge.recipe import load_recipe
from loraforge.run.session import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One real training run of the tiny model, shared by the tests that read its results."""
    from conftest import recipe_dict, write_jsonl

    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "train.jsonl", chat_records(32))
    d = recipe_dict(tiny_model_dir, data, tmp / "run", training={"max_steps": 30, "learning_rate": 1e-2})
    d["data"]["eval_split"] = 0.125
    (tmp / "r.yaml").write_text(yaml.safe_dump(d))
    recipe = load_recipe(tmp / "r.yaml")
    return recipe, run(recipe, quiet=True)


def test_loss_goes_down(trained):
    _, result = trained
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 20
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_run_directory_is_self_describing(trained):
    recipe, result = trained
    d = result.run_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "plan.json", "versions.json", "metrics.jsonl", "train_summary.json"):
        assert (d / name).is_file(), name
    assert yaml.safe_load((d / "recipe.yaml").read_text()) == recipe.to_dict()
    plan = json.loads((d / "plan.json").read_text())
    assert plan["global_batch_size"] == 4 and plan["precision"]["label"] == "fp32"
    assert plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * plan["world_size"] == 4
    versions = json.loads((d / "versions.json").read_text())
    assert versions["torch"].startswith("2.") and versions["trl"] and versions["peft"]
    assert result.eval_loss is not None


def _logits(model, tok, text="What is your name?"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_merge_reload_gives_same_logits_and_answers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.use.infer import answer, load_for_inference, merge

    _, result = trained
    adapted, tok = load_for_inference(result.run_dir, device="cpu")
    out = merge(result.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    merged_tok = AutoTokenizer.from_pretrained(out)
    a, m = _logits(adapted, tok), _logits(merged, merged_tok)
    torch.testing.assert_close(a, m, atol=1e-4, rtol=1e-4)
    with adapted.disable_adapter():
        base = _logits(adapted, tok)
    assert (base - a).abs().max() > 1e-2  # the adapter really changes the model
    q = CHATS[0][0]
    assert answer(adapted, tok, q, 12) == answer(merged, merged_tok, q, 12)


def test_rerun_of_a_finished_run_does_not_train_again(trained):
    recipe, result = trained
    again = run(recipe, quiet=True)
    assert not again.trained and again.steps == result.steps


def test_different_recipe_in_used_run_dir_stops(trained):
    recipe, _ = trained
    other = recipe.model_copy(deep=True)
    other.training.learning_rate = 1e-3
    other._source = recipe.source
    with pytest.raises(UserError, match="holds a run of a different recipe; use --overwrite"):
        run(other, quiet=True)


def test_wrong_target_module_is_a_user_error(make_recipe):
    recipe = load_recipe(make_recipe(lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "qkv"]}))
    with pytest.raises(UserError, match=r"lora.target_modules: qkv not in this model; its linear layers are .*q_proj"):
        run(recipe, quiet=True)
    assert not Path(recipe.output_dir).exists()  # nothing half-written


def test_seq_length_beyond_model_context(make_recipe):
    recipe = load_recipe(make_recipe(), ["data.max_seq_length=4096"])
    with pytest.raises(UserError, match="beyond the model's context of 256 tokens"):
        run(recipe, quiet=True)


def test_packed_sequences_do_not_attend_across_boundaries(tiny_model_dir):
    """trl's bfd packing concatenates samples with restarting position_ids; in training (no cache) the
    attention kernels loraforge uses must keep each sample to itself, or packing would be wrong."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    a, b = torch.randint(5, 300, (1, 7)), torch.randint(5, 300, (1, 5))
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
        with torch.no_grad():
            alone = torch.cat([m(a, use_cache=False).logits, m(b, use_cache=False).logits], dim=1)
            packed = m(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_packing_trains(make_recipe):
    recipe = load_recipe(make_recipe(), ["data.packing=true", "training.max_steps=4"])
    result = run(recipe, quiet=True)
    assert result.trained and result.steps == 4
    assert result.train_loss is not None and result.train_loss == result.train_loss  # not NaN
