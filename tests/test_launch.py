"""Launch anywhere: configs parse, commands are right for machines we are not on, and the same recipe
trains the same adapter on 1 process, 2 DDP processes, and DeepSpeed ZeRO-2/ZeRO-3 on 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl
from safetensors.torch import load_file

from loraforge.errors import UserError
from loraforge.launch.accelerate import Topology, accelerate_args, config_file, cpu_threads, render_command
from loraforge.plan.strategy import STRATEGIES, check_supported, choose_strategy, strategy_from_env
from loraforge.resources import shipped_dir

CONFIGS = sorted(shipped_dir("accelerate_configs").glob("*.yaml"))
DS_JSONS = sorted((shipped_dir("accelerate_configs") / "deepspeed").glob("*.json"))


def test_every_strategy_has_single_and_multinode_configs():
    names = {p.name for p in CONFIGS}
    for s in STRATEGIES:
        assert config_file(s, 1).name in names
        assert config_file(s, 2).name in names
    assert len(DS_JSONS) == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_parses_every_config(path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(shipped_dir("accelerate_configs").parent)  # DeepSpeed JSON paths are repo-relative
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    raw = yaml.safe_load(path.read_text())
    assert defaults.distributed_type.value == raw["distributed_type"]
    assert args.num_machines == raw["num_machines"]
    if raw["distributed_type"] == "DEEPSPEED":
        assert Path(defaults.deepspeed_config["deepspeed_config_file"]).is_file()
    if raw["distributed_type"] == "FSDP":
        assert defaults.fsdp_config["fsdp_version"] == 2
        assert defaults.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
        assert defaults.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_accepts_every_json_once_the_trainer_fills_auto(path, tmp_path, tiny_model_dir):
    """The same path the Trainer takes: HF fills the "auto" values, then DeepSpeed's own config class."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             use_cpu=True, max_grad_norm=0.5)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # before: a ZeRO-3 config switches loading to zero.Init
    hf = HfTrainerDeepSpeedConfig(str(path))
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, num_training_steps=10)
        ds = DeepSpeedConfig(hf.config)
    finally:
        unset_hf_deepspeed_config()  # the config registers itself globally
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert ds.zero_optimization_stage == stage
    assert ds.train_micro_batch_size_per_gpu == 2 and ds.gradient_accumulation_steps == 4
    assert ds.gradient_clipping == 0.5
    assert (ds.zero_config.offload_optimizer is not None) == ("offload" in path.name)


def test_strategy_choice():
    assert choose_strategy("auto", 1, quantized=False) == ("single", "one process")
    assert choose_strategy("auto", 8, quantized=False, fits_replicated=True)[0] == "ddp"
    assert choose_strategy("auto", 8, quantized=True, fits_replicated=False)[0] == "fsdp"
    assert choose_strategy("auto", 8, quantized=False, fits_replicated=False)[0] == "zero3"
    assert choose_strategy("zero2", 8, quantized=False)[0] == "zero2"


@pytest.mark.parametrize("strategy", ["zero3", "zero3-offload"])
def test_qlora_with_zero3_is_refused_pointing_to_fsdp(strategy):
    with pytest.raises(UserError, match="not supported by peft/DeepSpeed; use --strategy fsdp"):
        check_supported(strategy, quantized=True)
    with pytest.raises(UserError, match="use --strategy fsdp"):
        choose_strategy(strategy, 8, quantized=True)


def test_strategy_is_read_back_from_accelerate_environment(tmp_path):
    ds3 = shipped_dir("accelerate_configs") / "deepspeed" / "zero3_offload.json"
    assert strategy_from_env({"WORLD_SIZE": "1"}) == "single"
    assert strategy_from_env({"WORLD_SIZE": "2"}) == "ddp"
    assert strategy_from_env({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert strategy_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == "zero2"
    assert strategy_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds3)}) == "zero3-offload"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3", "zero3-offload"])
def test_dry_run_for_2_nodes_of_8_gpus(strategy):
    topo = Topology(processes_per_node=8, nodes=2, node_rank=1, main_ip="10.0.0.1", main_port=29500)
    args = accelerate_args(strategy, topo, 2, "recipes/x.yaml", ["training.learning_rate=1e-4"])
    cmd = render_command(args)
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--num_processes") == "16" and flag("--num_machines") == "2"
    assert flag("--machine_rank") == "1" and flag("--main_process_ip") == "10.0.0.1"
    assert flag("--main_process_port") == "29500" and flag("--rdzv_backend") == "static"
    assert "--same_network" not in args  # the c10d/same_network trap cannot happen
    assert Path(flag("--config_file")).name.endswith("_multinode.yaml") and Path(flag("--config_file")).is_file()
    if strategy.startswith("zero"):
        assert Path(flag("--deepspeed_config_file")).is_file() and "--use_deepspeed" in args
    else:
        assert flag("--gradient_accumulation_steps") == "2"
    assert ("--multi_gpu" in args) == (strategy == "ddp")
    assert cmd.startswith("accelerate launch ") and cmd.endswith("-m loraforge.train recipes/x.yaml --set training.learning_rate=1e-4")
    # the command is one accelerate's own parser accepts
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(args)
    assert parsed.num_processes == 16 and parsed.machine_rank == 1


def test_processes_launched_here_get_the_cores_not_accelerates_one_thread():
    """accelerate launch gives each process OMP_NUM_THREADS=1 unless told: a lone process would compute on one core.
    A one-node launch on this machine passes the physical cores shared among its processes; a user's
    OMP_NUM_THREADS is left to accelerate; several nodes, SLURM and --hardware plans get nothing."""
    from accelerate.commands.launch import launch_command_parser

    assert cpu_threads(1, 1, True, {}, 16) == 16 and cpu_threads(8, 1, True, {}, 16) == 2
    assert cpu_threads(4, 1, True, {}, 2) == 1
    assert cpu_threads(1, 1, True, {"OMP_NUM_THREADS": "3"}, 16) is None and cpu_threads(1, 1, True, {}, None) is None
    assert cpu_threads(8, 2, True, {}, 16) is None  # several nodes: the command `slurm submit` renders
    assert cpu_threads(1, 1, False, {}, 16) is None  # planned for --hardware/--vram: not this machine's cores
    args = accelerate_args("single", Topology(1), 1, "r.yaml", threads=16)
    assert launch_command_parser().parse_args(args).num_cpu_threads_per_process == 16
    assert "--num_cpu_threads_per_process" not in accelerate_args("ddp", Topology(8, nodes=2, main_ip="h"), 1, "r.yaml")


def test_multinode_without_main_ip_is_refused():
    with pytest.raises(UserError, match="needs --main-ip"):
        accelerate_args("ddp", Topology(8, nodes=2), 1, "r.yaml")


def test_cli_dry_run(make_recipe):
    from typer.testing import CliRunner

    from loraforge.cli import app

    r = CliRunner().invoke(app, ["launch", str(make_recipe()), "--strategy", "zero2", "--gpus", "8", "--nodes", "2",
                                 "--node-rank", "0", "--main-ip", "10.0.0.1", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "accelerate launch --config_file" in r.output and "zero2_multinode.yaml" in r.output
    assert "micro-batch 1 x accumulation 1 x 16 = global batch 16" in r.output  # 4 asked, 16 processes: said plainly
    assert "cannot be split exactly over 16 process(es)" in r.output


# ------------------------------------------------------------------ real multi-process runs on CPU


def _topology_recipe(tmp: Path, model_dir: Path, name: str) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_records(48))
    d = recipe_dict(model_dir, data, tmp / name, training={
        "max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 1e-2,
        "lr_scheduler": "cosine", "warmup": 1, "save_steps": 5, "save_total_limit": 3,
    })
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


HARNESS = Path(__file__).parent / "harness"  # sitecustomize.py: test-only switches (real FSDP2 on CPU, NaN)


def _loraforge(*args, timeout=900, env=None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": f"{HARNESS}{os.pathsep}{Path(__file__).parent}"} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _adapter(run_dir: Path):
    return load_file(run_dir / "adapter_model.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("topology")
    _loraforge("train", str(_topology_recipe(tmp, tiny_model_dir, "one")), "--quiet")
    return tmp


# What accelerate must really run for each strategy: a plan that says "zero3" over a DDP run proves nothing.
RUNS_AS = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3-offload": "DEEPSPEED", "fsdp": "FSDP"}
CPU_FSDP = {"LORAFORGE_TEST_CPU_FSDP": "1"}  # tests/harness/sitecustomize.py: accelerate's FSDP2 path on CPU


def _rank_bytes(run_dir: Path, when: str) -> list[int]:
    rows = json.loads((run_dir / "memory.json").read_text())[when]["per_rank"]
    return [r["frozen_param_bytes"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "zero3-offload", "fsdp"])
def test_two_processes_train_the_same_adapter_as_one(one_process, tiny_model_dir, strategy):
    """2 CPU processes under each strategy, through accelerate's own code path for it (DeepSpeed engine;
    FSDP2 `fully_shard` via the harness), give the 1-process adapter at the same global batch.
    zero3-offload: the shipped JSON sets "zero_force_ds_cpu_optimizer": false. Without it accelerate swaps the
    Trainer's torch AdamW for DeepSpeedCPUAdam (a JIT-built C++ op; here its build never finished) and DeepSpeed
    itself refuses a client optimizer under offload (engine.py: ZeRORuntimeException)."""
    tmp = one_process
    recipe = _topology_recipe(tmp, tiny_model_dir, strategy)
    _loraforge("launch", str(recipe), "--strategy", strategy, "--gpus", "2", "--set", "training.device=cpu",
               env=CPU_FSDP if strategy == "fsdp" else None)
    launched = json.loads((tmp / strategy / "plan.json").read_text())["launch"]  # what accelerate really set up
    assert launched["accelerate_config"] == config_file(strategy, 1).name and launched["world_size"] == 2
    if strategy.startswith("zero"):
        assert launched["zero_stage"] == (2 if strategy == "zero2" else 3)
        assert (launched["offload_optimizer"], launched["offload_param"]) == (
            ("cpu", "cpu") if strategy == "zero3-offload" else (None, None))
    one, two = json.loads((tmp / "one" / "plan.json").read_text()), json.loads((tmp / strategy / "plan.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)  # really two processes
    assert two["strategy"] == strategy
    assert two["launch"]["distributed_type"] == RUNS_AS[strategy]  # and really that strategy
    full = _rank_bytes(tmp / "one", "after_load")[0]
    if strategy == "zero3":  # loaded under zero.Init: each rank holds its half of the base from the start
        assert all(abs(b - full / 2) <= 0.05 * full for b in _rank_bytes(tmp / strategy, "after_load"))
    if strategy == "fsdp":  # fully_shard: each rank keeps half of the base after preparation
        assert all(abs(b - full / 2) <= 0.05 * full for b in _rank_bytes(tmp / strategy, "after_prepare"))
    if strategy in ("ddp", "zero2"):  # replicated base
        assert _rank_bytes(tmp / strategy, "after_prepare") == [full, full]
    assert one["global_batch_size"] == two["global_batch_size"] == 8
    assert two["gradient_accumulation_steps"] * 2 == one["gradient_accumulation_steps"]  # halves as world doubles
    records = [json.loads(line) for line in (tmp / strategy / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert max(loss_steps) >= 10 and len(loss_steps) == len(set(loss_steps))  # only rank 0 logs
    assert _max_diff(_adapter(tmp / "one"), _adapter(tmp / strategy)) <= 1e-5


@pytest.mark.slow
def test_single_strategy_launches_one_process_through_accelerate(one_process, tiny_model_dir):
    """`loraforge launch --strategy single`: accelerate's simple launcher with single_gpu.yaml, one process,
    the adapter of `loraforge train` — on as many threads (accelerate's default of one thread gave 2.2e-6 here:
    another summation order)."""
    tmp = one_process
    _loraforge("launch", str(_topology_recipe(tmp, tiny_model_dir, "single")), "--strategy", "single",
               "--set", "training.device=cpu")
    launched = json.loads((tmp / "single" / "plan.json").read_text())["launch"]
    assert launched["accelerate_config"] == "single_gpu.yaml"
    assert (launched["distributed_type"], launched["world_size"]) == ("NO", 1)
    assert _max_diff(_adapter(tmp / "one"), _adapter(tmp / "single")) <= 1e-6


@pytest.mark.slow
def test_a_zero2_launch_that_accelerate_would_run_as_ddp_stops(one_process, tiny_model_dir):
    """ACCELERATE_USE_CPU=1 (what the SLURM CPU template used to export) makes AcceleratorState(cpu=True) skip
    DeepSpeed: the ZeRO-2 launch would train plain MULTI_CPU DDP. Each process stops before training, saying so."""
    recipe = _topology_recipe(one_process, tiny_model_dir, "zero2-as-ddp")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "loraforge", "launch", str(recipe), "--strategy", "zero2", "--gpus", "2",
                           "--set", "training.device=cpu"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode != 0
    assert "launched for zero2 (DeepSpeed), but accelerate set up MULTI_CPU; unset ACCELERATE_USE_CPU" in proc.stderr
    launched = json.loads((one_process / "zero2-as-ddp" / "plan.json").read_text())["launch"]
    assert launched["distributed_type"] == "MULTI_CPU"  # what it would have trained as
    assert not (one_process / "zero2-as-ddp" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_plain_torchrun_works_too(one_process, tiny_model_dir):
    tmp = one_process
    recipe = _topology_recipe(tmp, tiny_model_dir, "torchrun")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    from loraforge.cli import _free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "loraforge.train", str(recipe), "--quiet"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp / "torchrun" / "plan.json").read_text())["world_size"] == 2
    assert _max_diff(_adapter(tmp / "one"), _adapter(tmp / "torchrun")) <= 1e-5


@pytest.mark.slow
def test_checkpoints_resume_across_topologies(one_process, tiny_model_dir):
    """A checkpoint written by 2 DDP processes resumes in 1 process, and the reverse, to the same adapter."""
    tmp = one_process
    reference = _adapter(tmp / "one")

    if not (tmp / "ddp" / "checkpoints" / "checkpoint-5").is_dir():
        _loraforge("launch", str(_topology_recipe(tmp, tiny_model_dir, "ddp")), "--strategy", "ddp", "--gpus", "2")
    recipe = _truncate_to_step_5(tmp, tmp / "ddp", tmp / "two-then-one")
    out = _loraforge("train", str(recipe), "--quiet")
    assert "resuming from" in out.stderr
    assert _max_diff(reference, _adapter(tmp / "two-then-one")) <= 1e-5

    recipe = _truncate_to_step_5(tmp, tmp / "one", tmp / "one-then-two")
    out = _loraforge("launch", str(recipe), "--strategy", "ddp", "--gpus", "2")
    assert "resuming from" in out.stderr
    assert json.loads((tmp / "one-then-two" / "plan.json").read_text())["world_size"] == 2
    assert _max_diff(reference, _adapter(tmp / "one-then-two")) <= 1e-5


def _truncate_to_step_5(tmp: Path, src: Path, dst: Path) -> Path:
    """A copy of a finished 10-step run as it was after its step-5 checkpoint; returns its recipe."""
    shutil.copytree(src, dst)
    for f in ("adapter_model.safetensors", "train_summary.json"):
        (dst / f).unlink()
    shutil.rmtree(dst / "checkpoints" / "checkpoint-10")
    recipe = yaml.safe_load((dst / "recipe.yaml").read_text())
    recipe["output_dir"] = str(dst)
    (dst / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    path = tmp / f"{dst.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_two_process_fsdp_checkpoint_resumes_to_the_same_adapter(one_process, tiny_model_dir):
    """accelerate#4206: FSDP2 + LoRA resume reset (N-1)/N of the adapter. Here: a 2-process FSDP2 run (real
    `fully_shard`, sharded checkpoints) resumed from its step-5 checkpoint gives the uninterrupted adapter."""
    tmp = one_process
    if not (tmp / "fsdp" / "checkpoints" / "checkpoint-5").is_dir():
        _loraforge("launch", str(_topology_recipe(tmp, tiny_model_dir, "fsdp")), "--strategy", "fsdp", "--gpus", "2",
                   "--set", "training.device=cpu", env=CPU_FSDP)
    assert any(p.is_dir() for p in (tmp / "fsdp" / "checkpoints" / "checkpoint-5").glob("pytorch_model_fsdp*"))  # sharded
    recipe = _truncate_to_step_5(tmp, tmp / "fsdp", tmp / "fsdp-resumed")
    out = _loraforge("launch", str(recipe), "--strategy", "fsdp", "--gpus", "2", "--set", "training.device=cpu",
                     env=CPU_FSDP)
    assert "resuming from" in out.stderr
    assert json.loads((tmp / "fsdp-resumed" / "plan.json").read_text())["launch"]["distributed_type"] == "FSDP"
    assert _max_diff(_adapter(tmp / "fsdp"), _adapter(tmp / "fsdp-resumed")) <= 1e-5
    assert _max_diff(_adapter(tmp / "one"), _adapter(tmp / "fsdp-resumed")) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_under_zero2_stops_or_skips_as_under_ddp(one_process, tiny_model_dir, policy):
    """ZeRO-2 steps inside backward and keeps gradients out of p.grad; the guard still sees a NaN step 3."""
    tmp = one_process
    recipe = _topology_recipe(tmp, tiny_model_dir, f"nan-{policy}")
    env = os.environ | {"PYTHONPATH": f"{HARNESS}{os.pathsep}{Path(__file__).parent}", "LORAFORGE_TEST_NAN_AT_STEP": "3"}
    proc = subprocess.run([sys.executable, "-m", "loraforge", "launch", str(recipe), "--strategy", "zero2", "--gpus", "2",
                           "--set", "training.device=cpu", "--set", f"training.on_nonfinite={policy}"],
                          capture_output=True, text=True, timeout=900, env=env)
    run_dir = tmp / f"nan-{policy}"
    assert json.loads((run_dir / "plan.json").read_text())["launch"]["distributed_type"] == "DEEPSPEED"
    if policy == "stop":
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "step 3: the loss or gradients became NaN/inf" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "error: a training process exited with code 2; its message is above"
        assert not (run_dir / "train_summary.json").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "DeepSpeed skipped the update" in proc.stderr
        weights = _adapter(run_dir)
        assert all(bool(w.isfinite().all()) for w in weights.values())


@pytest.fixture(scope="module")
def quickstart_one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart-topology")
    _loraforge("train", "quickstart", *_quickstart_overrides(tmp / "one"), "--quiet", timeout=1200)
    return tmp


def _quickstart_overrides(run_dir: Path) -> list[str]:
    sets = [f"output_dir={run_dir}", "training.max_steps=10", "training.global_batch_size=4",
            "training.micro_batch_size=1", "data.eval_split=0", "samples.prompts=[]", "tracking.backend=none",
            "data.max_seq_length=128", "training.device=cpu",
            # AdamW turns float-summation noise (different reduction order over 2 ranks) into updates of up to
            # ~lr on near-zero gradients: at 1e-3 the max element differed by 8.6e-5 (7e-6 relative); at 1e-4 it is <= 1e-5.
            "training.learning_rate=1e-4"]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"] if os.environ.get("LORAFORGE_TEST_ALL_STRATEGIES") else ["ddp"])
def test_quickstart_on_two_processes_matches_one(quickstart_one_process, strategy):
    """The issue's "done when": `loraforge launch recipes/quickstart.yaml --strategy X` on 2 CPU processes
    gives the 1-process adapter of the real SmolLM2-135M model (10 optimizer steps, same global batch).
    DDP only in CI: ZeRO-2/ZeRO-3 on 2 processes are proved on the tiny model
    (test_two_processes_train_the_same_adapter_as_one); on SmolLM2 they passed once (2026-12-02) and took 4x the
    DDP run's time (ZeRO-3: 139 s vs 35 s), which the 30-minute suite cannot afford. Run them by hand with
    LORAFORGE_TEST_ALL_STRATEGIES=1."""
    tmp = quickstart_one_process
    _loraforge("launch", "quickstart", "--strategy", strategy, "--gpus", "2",
               *_quickstart_overrides(tmp / strategy), timeout=1200)
    one, two = json.loads((tmp / "one" / "plan.json").read_text()), json.loads((tmp / strategy / "plan.json").read_text())
    assert (one["world_size"], two["world_size"], two["strategy"]) == (1, 2, strategy)
    assert (one["gradient_accumulation_steps"], two["gradient_accumulation_steps"]) == (4, 2)
    assert _max_diff(_adapter(tmp / "one"), _adapter(tmp / strategy)) <= 1e-5
