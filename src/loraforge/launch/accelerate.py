"""`loraforge launch`: choose a strategy, compose the `accelerate launch` command, run it in-process.

Composition is pure (`choose_strategy`, `accelerate_args`), so the exact command for a machine you
are not on (8 GPUs x 2 nodes) is tested on a laptop. Running it calls accelerate's own launcher in
this process, as trl's CLI does: `launch_command(launch_command_parser().parse_args(args))`.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError
from loraforge.plan.strategy import CONFIG_ENV
from loraforge.resources import shipped_dir

_CONFIG = {
    "single": "single_gpu",
    "ddp": "ddp",
    "fsdp": "fsdp",
    "zero2": "zero2",
    "zero3": "zero3",
    "zero3-offload": "zero3_offload",
}

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


def cpu_threads(processes_per_node: int, nodes: int, planned_here: bool, environ,
                physical_cores: int | None) -> int | None:
    """Threads per process for a launch on this machine, or None to leave it to accelerate.

    `accelerate launch` gives each process it starts OMP_NUM_THREADS = --num_cpu_threads_per_process, which
    defaults to 1 unless OMP_NUM_THREADS is set (accelerate/commands/launch.py): a lone process then computes on
    one core where `loraforge train` (torch's default) uses every physical core. The node's physical cores shared
    among its processes; an OMP_NUM_THREADS the user exported is kept (accelerate reads it itself). Used for a
    one-node launch planned for this machine only (`planned_here`: no --hardware/--vram): on several nodes each
    node's launch (the sbatch template's OMP_NUM_THREADS per node, or the user's wrapper) knows its own cores,
    and the command stays the one `slurm submit` renders."""
    if nodes > 1 or not planned_here or environ.get("OMP_NUM_THREADS") or not physical_cores:
        return None
    return max(physical_cores // max(processes_per_node, 1), 1)


def accelerate_args(
    strategy: str, topo: Topology, gradient_accumulation_steps: int, recipe: str, overrides: list[str] | tuple = (),
    threads: int | None = None,
) -> list[str]:
    """The arguments of `accelerate launch` (without the program name) for this strategy and topology;
    `threads`: --num_cpu_threads_per_process (cpu_threads(); None for a node that is not this machine)."""
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
    if threads:
        args += ["--num_cpu_threads_per_process", str(threads)]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loraforge.train", recipe]
    for o in overrides:
        args += ["--set", o]
    return args


def render_command(args: list[str]) -> str:
    return "accelerate launch " + " ".join(shlex.quote(a) for a in args)


def run_accelerate(args: list[str]) -> None:
    """Start the processes with accelerate's launcher, in this process (as `accelerate launch` would)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if "--config_file" in args:  # accelerate hands its environment to the ranks: each records its config
        os.environ[CONFIG_ENV] = Path(args[args.index("--config_file") + 1]).name
    launch_command(launch_command_parser().parse_args(args))


