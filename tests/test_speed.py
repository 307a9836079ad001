"""What the speed work rests on: the CPU plan, the token count, the FLOP count, the tokenized-data cache."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.data.prepare import prepare
from loraforge.plan.hardware import Gpu, Hardware
from loraforge.plan.planner import make_plan
from loraforge.recipe import load_recipe
from loraforge.run.session import run


def _shape():
    from loraforge.plan.memory import model_shape

    return model_shape({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                        "tie_word_embeddings": True, "max_position_embeddings": 8192})


def test_cpu_plan_runs_the_whole_step_as_rows_one_per_forward(make_recipe):
    recipe = load_recipe(make_recipe(), ["training.global_batch_size=8"])
    plan = make_plan(recipe, Hardware(kind="cpu", ram_gib=24), 300, 8192, shape=_shape(), lengths=[100] * 50)
    assert (plan.batch.micro_batch_size, plan.batch.gradient_accumulation_steps) == (8, 1)
    assert plan.rows_per_forward == 1 and plan.loss_head == "plain"
    assert any("one row per forward" in n for n in plan.notes)
    # the memory predicted is that of one row of max_seq_length tokens, not of 8 samples at once
    one_row = make_plan(load_recipe(make_recipe(), ["training.global_batch_size=1"]), Hardware(kind="cpu", ram_gib=24),
                        300, 8192, shape=_shape(), lengths=[100] * 50)
    assert plan.to_dict()["predicted_peak_gib"] == one_row.to_dict()["predicted_peak_gib"]
    # a split fixed in the recipe is kept
    fixed = make_plan(load_recipe(make_recipe(), ["training.global_batch_size=8", "training.micro_batch_size=2"]),
                      Hardware(kind="cpu", ram_gib=24), 300, 8192, shape=_shape())
    assert (fixed.batch.micro_batch_size, fixed.batch.gradient_accumulation_steps) == (2, 4)


def test_gpu_plan_keeps_the_fused_head_and_never_splits_a_micro_batch(make_recipe):
    recipe = load_recipe(make_recipe(), ["training.global_batch_size=32", "training.device=auto"])
    hw = Hardware(kind="cuda", gpus=(Gpu("NVIDIA A100-SXM4-80GB", 80.0, (8, 0)),), ram_gib=500)
    plan = make_plan(recipe, hw, 300, 8192, shape=_shape(), lengths=[300] * 50)
    assert plan.loss_head == "fused" and plan.rows_per_forward == plan.batch.micro_batch_size


def test_every_real_token_is_counted_once_and_no_padding(make_recipe):
    """One epoch over samples of different lengths: tokens seen = the sum of their lengths, nothing more."""
    from conftest import CHATS

    rows = [{"messages": [{"role": "user", "content": q * (1 + i % 3)}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(CHATS * 2)]
    recipe = load_recipe(make_recipe(data_rows=rows), ["training.max_steps=-1", "training.epochs=1"])
    prep = prepare(recipe, Hardware(kind="cpu", ram_gib=24))
    result = run(recipe, quiet=True)
    assert result.steps == len(rows) // recipe.training.global_batch_size
    assert result.tokens_seen == sum(prep.lengths)
    assert 0 < result.mfu <= 1 if result.mfu is not None else "uncertain" in result.peak_source  # busy machine
    assert result.startup_s is not None and result.startup_s > 0
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    assert summary["startup_stages"]["first_step"] == pytest.approx(result.startup_s, abs=0.01)


def test_flop_count_matches_torch_flop_counter(tiny_model_dir):
    """The LoRA-step formula equals what torch counts for a real forward + backward of one sample (eager
    attention computes the full square and masks it: that surplus over the causal count is added back)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from loraforge.plan.flops import lora_step_flops_per_token
    from loraforge.plan.memory import model_shape

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    shape = model_shape(model.config.to_dict())
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.enable_input_require_grads()  # so that every layer's input gradient is computed, as the formula counts
    n = 48
    ids = torch.randint(5, 300, (1, n))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    counted = counter.get_total_flops()
    predicted = lora_step_flops_per_token(shape, 8, "all-linear", [n]) * n
    surplus = 3 * shape.layers * 4 * shape.heads * shape.head_dim * (n * n - n * (n + 1) / 2)
    assert counted == pytest.approx(predicted + surplus, rel=0.02)


def test_tokenized_data_is_cached_by_content_tokenizer_and_settings(make_recipe, tmp_path, monkeypatch):
    from loraforge.data import tokencache

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = tokencache.save
    monkeypatch.setattr(tokencache, "save", lambda *a: (calls.append(a[0]), real(*a)))
    hw = Hardware(kind="cpu", ram_gib=24)
    path = make_recipe()
    first = prepare(load_recipe(path), hw)
    again = prepare(load_recipe(path), hw)
    assert len(calls) == 1  # the second run read the entry
    assert again.train_ds["input_ids"] == first.train_ds["input_ids"] and again.lengths == first.lengths
    assert again.train_ds["labels"] == first.train_ds["labels"]
    # settings applied after tokenization reuse the entry; anything that changes the tokens does not
    prepare(load_recipe(path, ["data.max_seq_length=32"]), hw)
    assert len(calls) == 1
    prepare(load_recipe(path, ["data.loss_on=all"]), hw)
    prepare(load_recipe(path, ["data.system_prompt=Be brief."]), hw)
    assert len(calls) == 3 and len(set(calls)) == 3
    # a damaged entry is ignored and rewritten, never trusted
    entry = tmp_path / "cache" / "tokenized" / calls[0]
    (entry / "meta.json").write_text("{not json")
    again = prepare(load_recipe(path), hw)
    assert len(calls) == 4 and again.lengths == first.lengths
