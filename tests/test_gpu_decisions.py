"""Decisions of the GPU / multi-node paths that have no CPU equivalent, as pure functions: the DeepSpeed
multi-node launcher, 8-bit + FSDP refusal, MFU peaks by GPU name, free memory through NVML (mocked; no CUDA
context in the launcher), OOM recognition and the probe's reserve, and the srun CPU binding of the sbatch."""

from __future__ import annotations

import re
import subprocess

import pytest

from loraforge.errors import UserError
from loraforge.launch.accelerate import Topology, accelerate_args
from loraforge.plan.strategy import check_supported, choose_strategy
from loraforge.resources import shipped_dir

# ------------------------------------------------------------------ DeepSpeed over several nodes


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3-offload"])
def test_multinode_deepspeed_uses_the_standard_launcher(strategy, monkeypatch):
    """Without it accelerate composes `deepspeed --hostfile None --launcher pdsh`: one local job per node."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = accelerate_args(strategy, Topology(8, nodes=2, node_rank=1, main_ip="10.0.0.1", main_port=29511), 1, "r.yaml")
    assert args[args.index("--deepspeed_multinode_launcher") + 1] == "standard"
    parsed, _, _ = _validate_launch_command(launch_command_parser().parse_args(args))
    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    parsed.deepspeed_fields_from_accelerate_config = []  # launch_command fills it from the config file
    cmd, env = prepare_deepspeed_cmd_env(parsed)
    assert cmd is None  # accelerate's own torchrun path, not a `deepspeed` runner command
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node) == ("2", 1, "8")
    assert parsed.rdzv_endpoint == "10.0.0.1:29511" and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    # the shipped multi-node YAML says so too (for users who run `accelerate launch --config_file` themselves)
    name = {"zero2": "zero2", "zero3": "zero3", "zero3-offload": "zero3_offload"}[strategy]
    monkeypatch.chdir(shipped_dir("accelerate_configs").parent)
    plain = launch_command_parser().parse_args(
        ["--config_file", str(shipped_dir("accelerate_configs") / f"{name}_multinode.yaml"), "--machine_rank", "1",
         "train.py"])
    plain, _, _ = _validate_launch_command(plain)
    assert plain.deepspeed_multinode_launcher == "standard"
    assert "--deepspeed_multinode_launcher" not in accelerate_args(strategy, Topology(8), 1, "r.yaml")  # one node


def test_zero3_offload_json_lets_the_trainer_optimizer_run():
    import json

    cfg = json.loads((shipped_dir("accelerate_configs") / "deepspeed" / "zero3_offload.json").read_text())
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # accelerate (accelerator.py: map_pytorch_optim_to_deepspeed) and DeepSpeed (engine.py ZeRORuntimeException)
    # both key on this flag; false keeps the Trainer's torch AdamW on the offloaded fp32 master weights
    assert cfg["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in cfg


# ------------------------------------------------------------------ 8-bit bases


def test_8bit_base_with_fsdp_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^strategy fsdp with an 8-bit base .* set quantization.mode: 4bit"):
        check_supported("fsdp", "8bit")
    with pytest.raises(UserError, match="8-bit base"):
        choose_strategy("fsdp", 8, "8bit")
    check_supported("fsdp", "4bit")  # QLoRA shards
    check_supported("ddp", "8bit")  # replicated 8-bit trains
    assert choose_strategy("auto", 8, "8bit", fits_replicated=True)[0] == "ddp"
    with pytest.raises(UserError, match="cannot be sharded"):  # never auto-chosen into FSDP
        choose_strategy("auto", 8, "8bit", fits_replicated=False)
    assert choose_strategy("auto", 8, "4bit", fits_replicated=False)[0] == "fsdp"
    assert choose_strategy("auto", 8, True, fits_replicated=False)[0] == "fsdp"  # a bool still means 4-bit


def test_8bit_fsdp_launch_exits_2_naming_the_fix(make_recipe):
    from typer.testing import CliRunner

    from loraforge.cli import app

    recipe = make_recipe(quantization={"mode": "8bit"})
    r = CliRunner().invoke(app, ["launch", str(recipe), "--strategy", "fsdp", "--hardware", "a100-80gb", "--gpus", "8",
                                 "--dry-run"])
    assert r.exit_code == 2 and "set quantization.mode: 4bit" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------ MFU peaks


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA GeForce RTX 3060", 25.5),  # FP32 accumulate (51 is the FP16-accumulate line)
    ("NVIDIA GeForce RTX 3060 Ti", 32.4),
    ("NVIDIA GeForce RTX 3090", 71.2),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA L40S", 362.0),  # not L40's 181
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA H100 PCIe", 756.0),  # not the SXM part's 989
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10G", 125.0),
    ("Tesla T4", 65.0),
    ("NVIDIA B200", 2250.0),  # not in loraforge's table: trl's
])
def test_gpu_peak_by_name(name, tflops):
    from loraforge.plan.flops import gpu_peak_flops

    assert gpu_peak_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak():
    from loraforge.plan.flops import gpu_peak_flops

    assert gpu_peak_flops("Some Future Accelerator") is None


def test_table_lists_specific_names_before_their_prefixes():
    from loraforge.plan.flops import GPU_PEAK_TFLOPS, _matches

    names = [n for n, _ in GPU_PEAK_TFLOPS]
    for i, longer in enumerate(names):
        for shorter in names[i + 1:]:
            assert not _matches(longer, shorter), (longer, shorter)  # a later entry never shadows an earlier one
        for earlier in names[:i]:
            if longer != earlier and _matches(earlier, longer):
                pytest.fail(f"{earlier} comes before {longer} and would match it")


# ------------------------------------------------------------------ free memory without a CUDA context


class FakeNvml:
    def __init__(self, gpus):
        self.gpus, self.closed = gpus, False

    def count(self):
        return len(self.gpus)

    def name(self, i):
        return self.gpus[i][0]

    def memory(self, i):
        return self.gpus[i][1] * 2**30, self.gpus[i][2] * 2**30

    def capability(self, i):
        return (8, 0)

    def close(self):
        self.closed = True


def _no_cuda(monkeypatch):
    import torch

    def boom(*a, **k):
        raise AssertionError("the launcher opened a CUDA context")

    for fn in ("mem_get_info", "is_available", "device_count", "get_device_properties", "init"):
        monkeypatch.setattr(torch.cuda, fn, boom)


def test_free_memory_comes_from_nvml_without_cuda(monkeypatch):
    from loraforge.plan import hardware

    _no_cuda(monkeypatch)
    nvml = FakeNvml([("NVIDIA A100-SXM4-80GB", 80, 79.5), ("NVIDIA A100-SXM4-80GB", 80, 12.0), ("X", 80, 1.0)])
    monkeypatch.setattr(hardware.Nvml, "load", classmethod(lambda cls: nvml))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    hw = hardware.detect(free_memory=True)
    assert hw.kind == "cuda" and [g.free_gib for g in hw.gpus] == [12.0, 79.5]  # CUDA's order
    assert hw.gpus[0].total_gib == 80 and hw.gpus[0].capability == (8, 0) and nvml.closed


def test_without_nvml_a_child_measures_else_the_cpu(monkeypatch):
    from loraforge.plan.hardware import Gpu, local_gpus_without_context

    child = lambda: (Gpu("NVIDIA L4", 22.0, (8, 9), 21.5),)  # noqa: E731
    assert local_gpus_without_context(lambda: None, child, lambda: True) == (child(), "child process")
    assert local_gpus_without_context(lambda: None, child, lambda: False) == ((), "none")  # a CPU build of torch
    assert local_gpus_without_context(lambda: None, lambda: None, lambda: True) == ((), "none")
    nvml = FakeNvml([("NVIDIA L4", 22, 20)])
    gpus, how = local_gpus_without_context(lambda: nvml, lambda: pytest.fail("child not needed"), lambda: True)
    assert how == "nvml" and gpus[0].free_gib == 20


def test_cuda_visible_devices_mapping():
    from loraforge.plan.hardware import visible_indices

    assert visible_indices(4, {}) == [0, 1, 2, 3]
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": "1,7,2"}) == [1]  # CUDA stops at the first invalid id
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": "GPU-3b1c"}) is None  # UUIDs: measure in a child


def test_launch_counts_gpus_without_cuda(monkeypatch, make_recipe):
    from typer.testing import CliRunner

    from loraforge.cli import app
    from loraforge.plan import hardware

    _no_cuda(monkeypatch)
    nvml = FakeNvml([("NVIDIA A100-SXM4-80GB", 80, 79.0)] * 4)
    monkeypatch.setattr(hardware.Nvml, "load", classmethod(lambda cls: nvml))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    r = CliRunner().invoke(app, ["launch", str(make_recipe(training={"device": "auto"})), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "1 node(s) x 4 process(es)" in r.output and "--num_processes 4" in r.output


def test_real_nvml_loader_is_harmless_without_a_driver():
    from loraforge.plan.hardware import Nvml

    nvml = Nvml.load()  # no libnvidia-ml here: None; on a GPU box an object that reads the real GPUs
    if nvml is not None:
        assert nvml.count() >= 0
        nvml.close()


# ------------------------------------------------------------------ OOM recognition and the probe's reserve


@pytest.mark.parametrize("exc, oom", [
    ("torch", True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"), True),
    (RuntimeError("Error out of memory at line 94 in file /src/csrc/pythonInterface.cpp"), True),  # bitsandbytes
    (RuntimeError("CUBLAS ERROR: Status 3"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x2)"), False),
    (ValueError("out of memory"), False),  # not an allocation failure type
])
def test_out_of_memory_is_recognised_whatever_type_it_arrives_as(exc, oom):
    import torch

    from loraforge.run.memguard import is_out_of_memory

    if exc == "torch":
        exc = torch.OutOfMemoryError("CUDA out of memory")
    assert is_out_of_memory(exc) is oom


def test_probe_reserves_optimizer_state_and_ddp_buckets():
    from loraforge.run.memguard import training_state_bytes

    n = 1_000_000
    assert training_state_bytes(n, 4, "adamw_torch", 1, "single") == 8 * n  # two fp32 moments
    assert training_state_bytes(n, 4, "adamw_torch", 2, "ddp") == 12 * n  # + a bucket copy of every gradient
    assert training_state_bytes(n, 4, "paged_adamw_8bit", 2, "ddp") == 6 * n
    assert training_state_bytes(n, 4, "sgd", 1, "single") == 0


def test_preflight_backs_off_on_a_cublas_allocation_failure(monkeypatch):
    """A RuntimeError allocation failure (not torch.OutOfMemoryError) makes the guard shrink the micro-batch."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    import torch

    from loraforge.plan.planner import BatchPlan
    from loraforge.run import memguard

    seen = []

    def probe(trainer, micro, *a, **k):
        seen.append((micro, a[-1]))
        if micro > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(memguard, "_probe", probe)
    monkeypatch.setattr(memguard, "_cleanup", lambda model: None)
    model = torch.nn.Linear(10, 10)
    model.config = SimpleNamespace(vocab_size=100)
    args = SimpleNamespace(optim="adamw_torch", per_device_train_batch_size=8, per_device_eval_batch_size=8,
                           gradient_accumulation_steps=1, train_batch_size=8)
    trainer = SimpleNamespace(model=model, args=args)

    @dataclass(frozen=True)
    class Plan:
        batch: BatchPlan
        strategy: str = "single"
        max_seq_length: int = 16
        gradient_checkpointing: bool = False
        notes: tuple = ()
        rows_per_forward: int | None = None

    plan = Plan(BatchPlan(8, 1, 1, 8, ()))
    hw = SimpleNamespace(kind="cuda", rank=0)
    out = memguard.preflight(trainer, plan, hw, 0)
    assert out.batch.micro_batch_size == 2 and out.batch.gradient_accumulation_steps == 4
    assert [m for m, _ in seen] == [8, 4, 2] and seen[0][1] == 8 * 110  # AdamW moments of the 110 weights


# ------------------------------------------------------------------ SLURM: CPUs per task, threads, no CPU flag


def _script(make_recipe, *extra) -> str:
    from typer.testing import CliRunner

    from loraforge.cli import app

    r = CliRunner().invoke(app, ["slurm", "submit", str(make_recipe()), *extra, "--dry-run"])
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.mark.parametrize("nodes", [1, 2])
def test_srun_passes_the_cpus_on_and_sets_threads(make_recipe, tmp_path, nodes):
    script = _script(make_recipe, "--nodes", str(nodes), "--gpus-per-node", "8", "--cpus-per-task", "64")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert '--cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"' in srun
    assert "#SBATCH --cpus-per-task=64" in script
    body = re.search(r"bash -c '([^']*)' &$", script, re.M).group(1)
    probe = body.split("exec accelerate")[0] + 'echo "$OMP_NUM_THREADS $LORAFORGE_ACCELERATE_CONFIG"'
    run = lambda **env: subprocess.run(["bash", "-c", probe], capture_output=True, text=True,  # noqa: E731
                                       env={"PATH": "/usr/bin:/bin", "SLURM_NODEID": "0", **env}).stdout.splitlines()[-1].split()
    assert run(SLURM_CPUS_PER_TASK="64")[0] == "8"  # 64 CPUs / 8 processes
    assert run(SLURM_CPUS_PER_TASK="4")[0] == "1"  # never 0
    assert run(SLURM_CPUS_PER_TASK="64", OMP_NUM_THREADS="3")[0] == "3"  # an explicit setting wins
    assert run()[1] == ("ddp_multinode.yaml" if nodes > 1 else "ddp.yaml")


def test_cpu_jobs_do_not_turn_deepspeed_off(make_recipe):
    """ACCELERATE_USE_CPU=1 makes AcceleratorState(cpu=True) skip DeepSpeed (state.py) and train DDP silently."""
    script = _script(make_recipe, "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--strategy", "zero2")
    assert "ACCELERATE_USE_CPU" not in script
    assert "--use_deepspeed" in script and "--deepspeed_multinode_launcher standard" in script


def test_a_deepspeed_launch_that_accelerate_runs_as_ddp_stops():
    from loraforge.run.launched import check_launched

    check_launched({"strategy": "zero2", "distributed_type": "DEEPSPEED"})
    check_launched({"strategy": "ddp", "distributed_type": "MULTI_CPU"})
    with pytest.raises(UserError, match="launched for zero3 .DeepSpeed., but accelerate set up MULTI_CPU"):
        check_launched({"strategy": "zero3", "distributed_type": "MULTI_CPU"})
