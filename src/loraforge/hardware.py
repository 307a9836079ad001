"""What this process runs on: accelerators, their bf16 support, and the process topology.

Detection reads torch and the launcher's environment variables (accelerate / torchrun / SLURM); the
result is plain data so that decisions about it (planner.py) are pure functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float
    capability: tuple[int, int]
    free_gib: float | None = None  # measured only when asked (`loraforge env` / `plan`): it opens a CUDA context

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def tf32(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def flash_attention(self) -> bool:
        """FlashAttention-2 (and SDPA's flash kernel in bf16) needs Ampere or newer."""
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    """Accelerators on this node, and how many processes / nodes the launcher started."""

    kind: str  # "cuda" or "cpu"
    gpus: tuple[Gpu, ...] = ()
    ram_gib: float = 0.0
    world_size: int = 1
    num_nodes: int = 1
    rank: int = 0
    local_rank: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    strategy: str | None = None  # as launched (accelerate's environment) or as asked (`plan --strategy`)
    profile: str | None = None  # a hardware profile planned for, not this machine

    @property
    def bf16(self) -> bool:
        return self.kind == "cuda" and bool(self.gpus) and all(g.bf16 for g in self.gpus)

    @property
    def budget_gib(self) -> float:
        """Memory one process may use: the smallest GPU's total memory, or RAM on a CPU-only machine."""
        if self.kind == "cuda" and self.gpus:
            return min(g.total_gib for g in self.gpus)
        return self.ram_gib

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bf16"] = self.bf16
        d["budget_gib"] = round(self.budget_gib, 2)
        for g, gd in zip(self.gpus, d["gpus"]):
            gd.update(tf32=g.tf32, flash_attention=g.flash_attention)
        return d


def _int_env(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return default


def process_topology() -> dict:
    """World size, ranks and nodes as the launcher (torchrun/accelerate, or srun) set them."""
    world = _int_env("WORLD_SIZE", default=1)
    return {
        "world_size": world,
        "rank": _int_env("RANK", default=0),
        "local_rank": _int_env("LOCAL_RANK", default=0),
        "num_nodes": _int_env(
            "GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES",
            default=max(1, world // max(1, _int_env("LOCAL_WORLD_SIZE", default=world))),
        )
        if world > 1
        else 1,
    }


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _free_gib(torch, i: int) -> float | None:
    try:
        return torch.cuda.mem_get_info(i)[0] / 2**30
    except RuntimeError:
        return None


def detect(force_cpu: bool = False, free_memory: bool = False) -> Hardware:
    """This machine. `free_memory` also measures each GPU's free memory (opens a CUDA context on every GPU,
    so training processes do not ask for it)."""
    import torch

    topo = process_topology()
    gpus: tuple[Gpu, ...] = ()
    if not force_cpu and torch.cuda.is_available():
        gpus = tuple(
            Gpu(
                name=torch.cuda.get_device_name(i),
                total_gib=torch.cuda.get_device_properties(i).total_memory / 2**30,
                capability=torch.cuda.get_device_capability(i),
                free_gib=_free_gib(torch, i) if free_memory else None,
            )
            for i in range(torch.cuda.device_count())
        )
    strategy = None
    if topo["world_size"] > 1:
        try:
            from .launch import strategy_from_env

            strategy = strategy_from_env()
        except ImportError:
            strategy = "ddp"
    return Hardware(kind="cuda" if gpus else "cpu", gpus=gpus, ram_gib=_ram_gib(), strategy=strategy, **topo)
