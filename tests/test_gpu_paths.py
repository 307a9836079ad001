"""The GPU paths' decisions, tested where no GPU exists: one-GPU pinning, per-rank placement before the load,
the training arguments built before the model, the DeepSpeed/FSDP2 NaN guard, the adapter-completeness check
and the per-rank memory report. Multi-process proofs on CPU (DeepSpeed, FSDP2 through accelerate's own path,
ZeRO-3 under zero.Init) are in test_launch.py; 2-node SLURM runs in test_slurm.py."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from loraforge.errors import UserError
from loraforge.plan import gpu_pin


# ---------------------------------------------------------------- 1. one process, one GPU
@pytest.mark.parametrize("env,count,pinned", [
    ({}, 8, "0"),  # an 8-GPU box, one process: GPU 0
    ({}, 1, None),  # one GPU: nothing to do
    ({}, 0, None),  # no GPU
    ({}, None, "0"),  # NVML unknown: pin anyway (harmless with one GPU)
    ({"CUDA_VISIBLE_DEVICES": "3"}, 1, None),  # the user chose one
    ({"CUDA_VISIBLE_DEVICES": "2,5"}, 2, "2"),  # the user's list: its first
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, None),
    ({"WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 8, None),  # a launcher's rank: never touched
])
def test_one_process_on_a_multi_gpu_box_pins_one_gpu(env, count, pinned):
    value, note = gpu_pin.decide(env, count)
    assert value == pinned
    assert (note is not None) == (pinned is not None)
    if note:
        assert "loraforge launch" in note and "DataParallel" in note


def test_the_pin_happens_before_cuda_and_is_in_the_plan(make_recipe, monkeypatch):
    """train.run on a (mocked) 8-GPU machine sets CUDA_VISIBLE_DEVICES=0 before anything else and says so in
    plan.json; the decision reads NVML's count, which opens no CUDA context."""
    from loraforge.recipe import load_recipe
    from loraforge.run.session import run

    # recorded by monkeypatch first, so the value the pin sets is undone afterwards (later tests launch processes)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unset-me")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    for k in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    seen = {}

    def count():
        seen["cuda_initialized_when_counted"] = torch.cuda.is_initialized()
        return 8

    monkeypatch.setattr(gpu_pin, "visible_gpu_count", count)
    monkeypatch.setattr(gpu_pin, "_NOTE", [])
    recipe = load_recipe(make_recipe(training={"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2,
                                               "device": "auto"}))
    result = run(recipe, quiet=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert seen == {"cuda_initialized_when_counted": False}
    notes = json.loads((result.run_dir / "plan.json").read_text())["notes"]
    assert any("8 GPUs: training on GPU 0 only" in n for n in notes)


def test_plan_says_so_for_a_multi_gpu_profile(make_recipe, monkeypatch):
    from loraforge.plan.planner import make_plan
    from loraforge.recipe import load_recipe

    monkeypatch.setattr(gpu_pin, "_NOTE", [])
    hw = SimpleNamespace(kind="cuda", bf16=True, world_size=1, gpus=(object(),) * 4, strategy=None)
    plan = make_plan(load_recipe(make_recipe()), hw, 100, 2048)
    assert any("4 GPUs visible: training uses one GPU" in n for n in plan.notes)


# ---------------------------------------------------------------- 3/4. placement and order before the load
@pytest.mark.parametrize("strategy", ["single", "ddp", "zero2", "fsdp", "zero3"])
def test_a_quantized_base_is_placed_on_its_own_rank_under_every_strategy(strategy):
    """bitsandbytes' quantizer turns device_map=None into {"": current_device()} = GPU 0 on every rank: a
    quantized base always gets its rank's GPU. 4-bit under FSDP/ZeRO-3 stores packed weights in the compute dtype."""
    from loraforge.model.modeling import base_placement

    p = base_placement("cuda", strategy, 3, "bfloat16", "4bit")
    assert p["device_map"] == {"": 3}
    assert p["quant_storage"] == ("bfloat16" if strategy in ("fsdp", "zero3") else None)
    assert base_placement("cuda", strategy, 3, "bfloat16", "8bit") == {"device_map": {"": 3}, "quant_storage": None}
    # 16-bit bases: the Trainer / the strategy place them (ZeRO-3 partitions them while loading)
    assert base_placement("cuda", strategy, 3, "bfloat16", "none") == {"device_map": None, "quant_storage": None}
    assert base_placement("cpu", strategy, 1, "float32", "4bit")["device_map"] is None


def test_training_arguments_exist_before_the_model_loads(make_recipe, monkeypatch):
    """The SFTConfig (which registers a ZeRO-3 config for zero.Init and sets the rank's device) is built
    before `from_pretrained` runs — the order a ZeRO-3 / FSDP+QLoRA run needs."""
    from loraforge.recipe import load_recipe
    from loraforge.run import session as train

    order = []
    real_cfg, real_load = train.sft_config, train.load_base_model
    monkeypatch.setattr(train, "sft_config", lambda *a, **k: order.append("args") or real_cfg(*a, **k))
    monkeypatch.setattr(train, "load_base_model", lambda *a, **k: order.append("model") or real_load(*a, **k))
    recipe = load_recipe(make_recipe(training={"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2,
                                               "device": "cpu"}))
    train.run(recipe, quiet=True)
    assert order == ["args", "model"]


def test_zero_ranks_do_not_tell_accelerate_cpu():
    """accelerate engages DeepSpeed only when not told `cpu` (state.py), and counts one process without a
    backend: ZeRO on a CPU machine keeps use_cpu off and names gloo (the 2-process tests in test_launch.py
    assert that DeepSpeed really ran: plan.json's distributed_type)."""
    from loraforge.run.sftconfig import device_kwargs

    assert device_kwargs(True, "single") == {"use_cpu": True, "ddp_backend": None}
    assert device_kwargs(True, "ddp") == {"use_cpu": True, "ddp_backend": "gloo"}
    for zero in ("zero2", "zero3", "zero3-offload"):
        assert device_kwargs(True, zero) == {"use_cpu": False, "ddp_backend": "gloo"}
    assert device_kwargs(False, "zero3") == {"use_cpu": False, "ddp_backend": None}  # GPUs: accelerate's default (nccl)


# ---------------------------------------------------------------- 7. NaN guard under DeepSpeed / FSDP2
class DeepSpeedOptimizerWrapper:  # the name accelerate's wrapper has; step_was_skipped = ZeRO's overflow
    def __init__(self, skipped):
        self.step_was_skipped = skipped


def _guard_call(policy, optimizer, params, fp16=False):
    from loraforge.run.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(policy, max_skipped=1)
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    args = SimpleNamespace(fp16=fp16)
    state = SimpleNamespace(global_step=2)
    guard.on_pre_optimizer_step(args, state, None, model=model, optimizer=optimizer)
    return guard


def test_deepspeed_overflow_stops_or_counts_a_skip():
    p = torch.nn.Parameter(torch.ones(3))  # under ZeRO p.grad stays None: the guard must not read it
    with pytest.raises(UserError, match="step 3: the loss or gradients became NaN/inf"):
        _guard_call("stop", DeepSpeedOptimizerWrapper(True), [p])
    assert _guard_call("skip", DeepSpeedOptimizerWrapper(True), [p]).skipped == 1
    assert _guard_call("stop", DeepSpeedOptimizerWrapper(False), [p]).skipped == 0


def test_deepspeed_applied_nan_update_stops():
    """No clipping: DeepSpeed computed no norm and applied the step; NaN weights stop the run."""
    p = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    with pytest.raises(UserError, match="LoRA weights became NaN/inf"):
        _guard_call("skip", DeepSpeedOptimizerWrapper(False), [p])


def test_fp16_overflow_skips_are_tolerated_up_to_the_limit():
    assert _guard_call("stop", DeepSpeedOptimizerWrapper(True), [torch.nn.Parameter(torch.ones(1))], fp16=True).skipped == 1


def test_fsdp2_gradient_shards_are_checked_locally():
    from loraforge.run.callbacks import _local

    class Shard(torch.Tensor):  # a DTensor stand-in: the guard must read to_local(), not the global view
        pass

    g = torch.tensor([float("inf")])
    fake = SimpleNamespace(to_local=lambda: g)
    assert _local(fake) is g


# ---------------------------------------------------------------- 6. a run is finished only with its adapter
def _expected():
    return Counter({(4, 8): 2, (8, 4): 2})


def _write_adapter(d: Path, tensors: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))


def test_adapter_problems_are_named(tmp_path):
    from loraforge.run.saving import adapter_problem

    good = {"a.A": torch.ones(4, 8), "a.B": torch.ones(8, 4), "b.A": torch.ones(4, 8), "b.B": torch.ones(8, 4)}
    _write_adapter(tmp_path / "ok", good)
    assert adapter_problem(tmp_path / "ok", _expected()) is None
    assert "was not written" in adapter_problem(tmp_path / "none", _expected())  # FSDP SHARDED: nothing saved
    _write_adapter(tmp_path / "part", {k: v for k, v in good.items() if k.startswith("a.")})
    assert "4 expected" in adapter_problem(tmp_path / "part", _expected())
    _write_adapter(tmp_path / "empty", {k: torch.ones(0) for k in good})  # ZeRO-3 placeholders saved
    assert "expected" in adapter_problem(tmp_path / "empty", _expected())
    _write_adapter(tmp_path / "nan", good | {"a.A": torch.full((4, 8), float("nan"))})
    assert "NaN/inf" in adapter_problem(tmp_path / "nan", _expected())
    bad = tmp_path / "trunc"
    _write_adapter(bad, good)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert "does not load" in adapter_problem(bad, _expected())


def test_full_shapes_of_sharded_parameters():
    from loraforge.run.saving import _full_shape

    assert _full_shape(SimpleNamespace(ds_shape=torch.Size([16, 4]), shape=torch.Size([0]))) == (16, 4)
    assert _full_shape(torch.nn.Parameter(torch.ones(3, 2))) == (3, 2)


def test_an_fsdp_run_switches_to_a_full_state_dict_for_the_final_save(tmp_path):
    from loraforge.run.saving import save_adapter

    calls = []

    class Plugin:
        state_dict_type = "StateDictType.SHARDED_STATE_DICT"
        state_dict_config = optim_state_dict_config = None

        def set_state_dict_type(self, t=None):
            calls.append(("set", t))
            if t:
                self.state_dict_type = t

    class Sharded:  # a DTensor stand-in: gathered with full_tensor() on every rank
        def full_tensor(self):
            calls.append("gather")
            return torch.ones(2, 2)

    plugin = Plugin()
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin),
                                  get_state_dict=lambda m: calls.append(("state", plugin.state_dict_type)) or {"w": Sharded()})
    trainer = SimpleNamespace(is_fsdp_enabled=True, accelerator=accelerator, model=None,
                              args=SimpleNamespace(should_save=True),
                              _save=lambda d, state_dict: calls.append(("save", type(state_dict["w"]).__name__)))
    save_adapter(trainer, tmp_path)
    assert [c for c in calls if c[0] != "set"][:3] == [("state", "FULL_STATE_DICT"), "gather", ("save", "Tensor")]  # whole, then written
    assert plugin.state_dict_type == "StateDictType.SHARDED_STATE_DICT"  # checkpoints stay sharded


# ---------------------------------------------------------------- 8. memory per rank, peak reset
def test_bytes_per_rank_count_partitions_and_shards():
    from loraforge.run.memreport import param_bytes

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Parameter(torch.ones(0), requires_grad=False)
            self.frozen.ds_tensor = torch.ones(50)  # ZeRO-3: the partition is what this rank stores
            self.lora = torch.nn.Parameter(torch.ones(10))

    b = param_bytes(M())
    assert b["frozen_param_bytes"] == 200 and b["trainable_param_bytes"] == 40


def test_the_cuda_peak_is_reset_after_the_preflight(monkeypatch, tmp_path):
    from loraforge.run import memreport

    calls = []
    monkeypatch.setattr(memreport, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    report = memreport.DeviceMemoryReport(SimpleNamespace(memory=None), tmp_path, 0)
    report.ready = True
    memreport.reset_after_preflight(report)
    assert calls == ["reset"]
    assert json.loads((tmp_path / "memory.json").read_text())["before_training"]["max_allocated_gib"] == 7.0


def test_memory_json_after_a_cpu_run(make_recipe):
    from loraforge.recipe import load_recipe
    from loraforge.run.session import run

    recipe = load_recipe(make_recipe(training={"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2,
                                               "device": "cpu"}))
    result = run(recipe, quiet=True)
    mem = json.loads((result.run_dir / "memory.json").read_text())
    assert set(mem) >= {"after_load", "after_prepare", "first_step", "end"}
    assert mem["after_load"]["per_rank"][0]["frozen_param_bytes"] > 0
    assert mem["after_prepare"]["per_rank"][0]["trainable_param_bytes"] > 0
    assert mem["end"]["measured"] == "process_rss" and result.peak_memory_gib == pytest.approx(
        max(r["peak_gib"] for r in mem["end"]["per_rank"]), rel=0.2)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["launch"]["distributed_type"] == "NO"


# ---------------------------------------------------------------- 13. FSDP + QLoRA: the load is planned too
def _shape70b():
    from loraforge.plan.memory import shape_from_config

    cfg = Path(__file__).parent / "fixtures" / "configs" / "llama-3-70b-instruct" / "config.json"
    return shape_from_config(json.loads(cfg.read_text()), "llama-3-70b-instruct")


def test_fsdp_qlora_plans_the_unsharded_load():
    """Each rank quantizes the whole base before FSDP shards it: 70B in 4-bit is ~40 GiB per GPU at load, so
    8 x 24 GiB cannot load it even though a sharded step needs a few GiB; 8 x 80 GiB can."""
    from loraforge.plan.memory import GIB, TrainSetup, estimate
    from loraforge.plan.planner import fsdp_qlora_load_bytes, peak_estimate, solve

    s = _shape70b()
    setup = TrainSetup(1, 2048, True, quant="4bit", world_size=8, strategy="fsdp")
    load = fsdp_qlora_load_bytes(s, setup)
    step = estimate(s, setup)
    assert 35 * GIB < load < 50 * GIB and step.peak < 20 * GIB  # the step alone would fit 24 GiB
    est = peak_estimate(s, setup)
    assert est.phase == "load" and est.peak >= load and "fsdp_qlora_load" in est.breakdown
    assert fsdp_qlora_load_bytes(s, setup.with_(strategy="ddp")) is None  # a replicated base: the step covers it
    assert fsdp_qlora_load_bytes(s, setup.with_(quant="none")) is None
    small = solve(s, setup, 64, budget_gib=23.5)
    assert not small.fits
    assert any("ZeRO-3" in x for x in small.suggestions)  # a 16-bit base loads sharded under zero.Init
    assert solve(s, setup, 64, budget_gib=79.0).fits
