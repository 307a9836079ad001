"""`loraforge launch`: choose a strategy, compose the `accelerate launch` command, run it in-process.

Composition is pure (`choose_strategy`, `accelerate_args`), so the exact command for a machine you
are not on (8 GPUs x 2 nodes) is tested on a laptop. Running it calls accelerate's own launcher in
this process, as trl's CLI does: `launch_command(launch_command_parser().parse_args(args))`.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError
from loraforge.resources import shipped_dir

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3-offload")
_CONFIG = {
    "single": "single_gpu",
    "ddp": "ddp",
    "fsdp": "fsdp",
    "zero2": "zero2",
    "zero3": "zero3",
    "zero3-offload": "zero3_offload",
}
SHARDS_BASE = ("fsdp", "zero3", "zero3-offload")


def quant_mode(quantized: bool | str) -> str:
    """The recipe's quantization.mode ("none", "4bit", "8bit"); a bare bool means none / 4-bit."""
    if isinstance(quantized, str):
        return quantized
    return "4bit" if quantized else "none"


def choose_strategy(requested: str, world_size: int, quantized: bool | str,
                    fits_replicated: bool | None = None) -> tuple[str, str]:
    """(strategy, why). `quantized`: quantization.mode (or a bool: 4-bit or not). `fits_replicated`: does the
    whole base + a step fit on one device (the plan's verdict)."""
    mode = quant_mode(quantized)
    if requested != "auto":
        if requested not in STRATEGIES:
            raise UserError(f"--strategy {requested}: use one of auto, {', '.join(STRATEGIES)}")
        check_supported(requested, quantized)
        if requested == "single" and world_size > 1:
            raise UserError(f"--strategy single runs one process, but {world_size} were asked; use ddp")
        return requested, "as asked"
    if world_size == 1:
        return "single", "one process"
    if fits_replicated is None or fits_replicated:
        return "ddp", "the model fits on one device: replicate it (DDP)"
    if mode == "8bit":
        raise UserError(
            "the 8-bit base does not fit on one device, and an 8-bit base cannot be sharded (FSDP needs 4-bit, "
            "ZeRO-3 no quantization): set quantization.mode: 4bit (FSDP + QLoRA) or none (ZeRO-3), or use larger GPUs"
        )
    if mode != "none":
        return "fsdp", "the quantized base does not fit on one device: shard it with FSDP (QLoRA-compatible)"
    return "zero3", "the base does not fit on one device: shard weights, gradients and optimizer with ZeRO-3"


def check_supported(strategy: str, quantized: bool | str) -> None:
    """Refuse, in one line, the strategy/quantization pairs peft, bitsandbytes and DeepSpeed cannot train."""
    mode = quant_mode(quantized)
    if mode == "8bit" and strategy == "fsdp":
        # bitsandbytes' Int8Params hold int8 data with a separate scale (SCB) that FSDP cannot flatten/shard;
        # only 4-bit weights stored in a float dtype (bnb_4bit_quant_storage) shard (LLaMA-Factory allows 4-bit only).
        raise UserError(
            "strategy fsdp with an 8-bit base (quantization.mode: 8bit) is not supported: FSDP shards only 4-bit "
            "bases; set quantization.mode: 4bit (FSDP + QLoRA), or use --strategy ddp (8-bit, replicated)"
        )
    if mode != "none" and strategy in ("zero3", "zero3-offload"):
        raise UserError(
            f"strategy {strategy} with a quantized (QLoRA) base is not supported by peft/DeepSpeed; "
            "use --strategy fsdp (FSDP + QLoRA) or quantization.mode: none"
        )


def strategy_from_env(environ=None) -> str:
    """The strategy this process was launched with, read from accelerate's environment variables."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        offload = False
        cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if cfg_file and Path(cfg_file).is_file():
            try:
                zero = json.loads(Path(cfg_file).read_text()).get("zero_optimization", {})
                stage = stage or str(zero.get("stage", ""))
                offload = zero.get("offload_optimizer", {}).get("device", "none") != "none" or zero.get(
                    "offload_param", {}
                ).get("device", "none") != "none"
            except (OSError, ValueError):
                pass
        if stage == "3":
            return "zero3-offload" if offload else "zero3"
        return f"zero{stage}" if stage in ("1", "2") else "zero2"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp" if world > 1 else "single"


@dataclass(frozen=True)
class Topology:
    processes_per_node: int
    nodes: int = 1
    node_rank: int = 0
    main_ip: str | None = None
    main_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes


def config_file(strategy: str, nodes: int) -> Path:
    name = _CONFIG[strategy] + ("_multinode" if nodes > 1 and strategy != "single" else "")
    return shipped_dir("accelerate_configs") / f"{name}.yaml"


def accelerate_args(
    strategy: str, topo: Topology, gradient_accumulation_steps: int, recipe: str, overrides: list[str] | tuple = ()
) -> list[str]:
    """The arguments of `accelerate launch` (without the program name) for this strategy and topology."""
    if topo.nodes > 1 and not topo.main_ip:
        raise UserError("--nodes > 1 needs --main-ip (the address of node 0) and --node-rank on each node")
    if not 0 <= topo.node_rank < topo.nodes:
        raise UserError(f"--node-rank {topo.node_rank}: must be between 0 and {topo.nodes - 1}")
    args = ["--config_file", str(config_file(strategy, topo.nodes))]
    if strategy != "single":
        args += ["--num_processes", str(topo.world_size), "--num_machines", str(topo.nodes)]
        if strategy == "ddp":
            args += ["--multi_gpu"]  # also what makes 2 CPU processes (not --cpu, which starts one)
    else:
        args += ["--num_processes", "1", "--num_machines", "1"]
    if topo.nodes > 1:
        args += [
            "--machine_rank", str(topo.node_rank),
            "--main_process_ip", str(topo.main_ip),
            "--main_process_port", str(topo.main_port),
            "--rdzv_backend", "static",  # each node states its own rank: no same_network/c10d endpoint trap
        ]
    elif strategy != "single":
        args += ["--main_process_port", str(topo.main_port)]
    if strategy.startswith("zero"):
        ds = shipped_dir("accelerate_configs") / "deepspeed" / f"{_CONFIG[strategy]}.json"
        args += ["--use_deepspeed", "--deepspeed_config_file", str(ds), "--zero3_init_flag",
                 "true" if strategy != "zero2" else "false"]
        if topo.nodes > 1:
            # Without it accelerate runs `deepspeed --hostfile None --launcher pdsh`: DeepSpeed's runner finds no
            # hostfile and starts a local-only job with master 127.0.0.1 on every node (runner.py). `standard`
            # starts torchrun on each node with this node's rank and the static rendezvous above: one world.
            args += ["--deepspeed_multinode_launcher", "standard"]
    else:
        # DeepSpeed's JSON takes accumulation from the Trainer ("auto"); for the others tell accelerate too.
        args += ["--gradient_accumulation_steps", str(gradient_accumulation_steps)]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loraforge.train", recipe]
    for o in overrides:
        args += ["--set", o]
    return args


def render_command(args: list[str]) -> str:
    return "accelerate launch " + " ".join(shlex.quote(a) for a in args)


CONFIG_ENV = "LORAFORGE_ACCELERATE_CONFIG"  # the accelerate config file the launcher used (read back by launch_record)


def run_accelerate(args: list[str]) -> None:
    """Start the processes with accelerate's launcher, in this process (as `accelerate launch` would)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if "--config_file" in args:  # accelerate hands its environment to the ranks: each records its config
        os.environ[CONFIG_ENV] = Path(args[args.index("--config_file") + 1]).name
    launch_command(launch_command_parser().parse_args(args))


def launch_record(accelerator, hw, environ=None) -> dict:
    """What really ran, as the training process sees it (plan.json's `launch`): accelerate's distributed type (DEEPSPEED,
    FSDP, MULTI_CPU, ...) and ZeRO stage, the world, and the accelerate config the launcher named."""
    env = os.environ if environ is None else environ
    state = accelerator.state
    ds = getattr(state, "deepspeed_plugin", None)
    zero = (ds.deepspeed_config or {}).get("zero_optimization", {}) if ds is not None else {}
    return {
        "accelerate_config": env.get(CONFIG_ENV),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "world_size": accelerator.num_processes,
        "num_nodes": hw.num_nodes,
        "zero_stage": getattr(ds, "zero_stage", zero.get("stage")) if ds is not None else None,
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device") if ds is not None else None,
        "offload_param": (zero.get("offload_param") or {}).get("device") if ds is not None else None,
        "strategy": hw.strategy or ("ddp" if hw.world_size > 1 else "single"),
    }


def check_launched(record: dict) -> None:
    """Stop (every rank, before training) when accelerate runs something else than the strategy launched: e.g.
    ACCELERATE_USE_CPU=1 makes AcceleratorState(cpu=True) skip DeepSpeed (state.py: `... == "true" and not cpu`)
    and train ZeRO jobs as plain MULTI_CPU DDP, silently."""
    strategy, got = record.get("strategy"), record.get("distributed_type")
    if strategy and strategy.startswith("zero") and got != "DEEPSPEED":
        hint = "; unset ACCELERATE_USE_CPU (it turns DeepSpeed off)" if os.environ.get("ACCELERATE_USE_CPU") else ""
        raise UserError(f"launched for {strategy} (DeepSpeed), but accelerate set up {got}{hint}")


@dataclass
class LaunchPlan:
    strategy: str
    why: str
    hw: object  # hardware.Hardware of the target topology
    plan: dict  # planview.build(): what every process will compute
    batch: object  # planner.BatchPlan of that plan


def plan_launch(recipe, strategy: str, per_node: int | None, nodes: int, hardware: str | None = None,
                vram: float | None = None) -> LaunchPlan:
    """Plan for the target topology with the memory model, pick the strategy from whether the model fits
    replicated, and refuse a plan that does not fit. Shared by `loraforge launch` and `loraforge slurm`."""
    from loraforge.launch import preview as planview
    from loraforge.plan.planner import BatchPlan

    def plan_for(strat: str):
        hw = planview.hardware(recipe, hardware, vram, per_node, nodes, None if strat == "single" else strat)
        return hw, planview.build(recipe, hw)

    hw, out = plan_for("ddp" if strategy == "auto" else strategy)
    chosen, why = choose_strategy(strategy, hw.world_size, recipe.quantization.mode,
                                  fits_replicated=out.get("fits"))
    if chosen != out.get("strategy"):
        hw, out = plan_for(chosen)
    if out.get("fits") is False:
        from loraforge.plan.planner import unfit_message

        raise UserError(unfit_message(out))
    batch = BatchPlan(out["micro_batch_size"], out["gradient_accumulation_steps"], out["world_size"],
                      out.get("requested_global_batch_size", out["global_batch_size"]), tuple(out.get("notes", [])))
    return LaunchPlan(chosen, why, hw, out, batch)

