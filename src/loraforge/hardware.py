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

    @property
    def bf16(self) -> bool:
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

    @property
    def bf16(self) -> bool:
        return self.kind == "cuda" and bool(self.gpus) and all(g.bf16 for g in self.gpus)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bf16"] = self.bf16
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
        "num_nodes": _int_env("GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
        if world > 1
        else 1,
    }


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def detect(force_cpu: bool = False) -> Hardware:
    import torch

    topo = process_topology()
    gpus: tuple[Gpu, ...] = ()
    if not force_cpu and torch.cuda.is_available():
        gpus = tuple(
            Gpu(
                name=torch.cuda.get_device_name(i),
                total_gib=torch.cuda.get_device_properties(i).total_memory / 2**30,
                capability=torch.cuda.get_device_capability(i),
            )
            for i in range(torch.cuda.device_count())
        )
    return Hardware(kind="cuda" if gpus else "cpu", gpus=gpus, ram_gib=_ram_gib(), **topo)
