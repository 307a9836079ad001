"""Planner decisions are pure functions of numbers: tested with numbers, no hardware."""

from __future__ import annotations

import pytest

from loraforge.plan.planner import choose_precision, choose_seq_length, plan_batch


@pytest.mark.parametrize(
    "global_batch, world, expect",
    [
        (16, 1, (8, 2)),
        (16, 2, (8, 1)),
        (16, 4, (4, 1)),
        (64, 8, (8, 1)),
        (128, 8, (8, 2)),
        (12, 1, (6, 2)),
        (7, 1, (7, 1)),
        (1, 1, (1, 1)),
    ],
)
def test_global_batch_is_kept_exactly(global_batch, world, expect):
    p = plan_batch(global_batch, world)
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == expect
    assert p.global_batch_size == global_batch and p.exact and not p.notes


def test_recipe_fixed_micro_batch_sets_accumulation():
    p = plan_batch(32, 2, micro_batch=4)
    assert (p.micro_batch_size, p.gradient_accumulation_steps, p.global_batch_size) == (4, 4, 32)


def test_inexact_split_is_said_plainly():
    p = plan_batch(10, 4)
    assert not p.exact
    assert p.global_batch_size in (8, 12)
    assert "cannot be split exactly over 4 process(es)" in p.notes[0]
    assert f"using {p.global_batch_size}" in p.notes[0]


def test_precision_choice():
    assert choose_precision(on_gpu=False, gpu_bf16=False).label == "fp32"
    assert choose_precision(on_gpu=False, gpu_bf16=False).use_cpu
    assert choose_precision(on_gpu=True, gpu_bf16=True).label == "bf16"
    assert choose_precision(on_gpu=True, gpu_bf16=False).label == "fp16"
    # bf16 asked on a GPU without it falls back to fp16 instead of failing
    assert choose_precision(on_gpu=True, gpu_bf16=False, requested_dtype="bfloat16").label == "fp16"


def test_seq_length_auto_and_fixed():
    assert choose_seq_length(512, 100, 2048)[0] == 512
    assert choose_seq_length("auto", 100, 2048)[0] == 128
    assert choose_seq_length("auto", 5000, 4096)[0] == 4096
