"""What this process runs on: accelerators, their bf16 support, and the process topology.

Detection reads torch and the launcher's environment variables (accelerate / torchrun / SLURM); the
result is plain data so that decisions about it (planner.py) are pure functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from loraforge.plan.strategy import strategy_from_env


@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float
    capability: tuple[int, int]
    free_gib: float | None = None  # measured only when asked (`loraforge env` / `plan` / `launch`), through NVML

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


# ------------------------------------------------------------------ GPUs without a CUDA context in this process
# `loraforge launch` / `plan` / `env` measure free memory and then (launch) stay alive for the whole run: a
# torch.cuda.mem_get_info there would hold a CUDA context (hundreds of MiB) on every GPU the training uses. NVML
# reads the same numbers with no context; without NVML a short-lived child process measures them.


class Nvml:
    """The few NVML calls needed, through ctypes on libnvidia-ml (the driver's library; no Python package)."""

    def __init__(self, lib):
        self.lib = lib

    @classmethod
    def load(cls) -> "Nvml | None":
        import ctypes

        for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            init = getattr(lib, "nvmlInit_v2", None) or getattr(lib, "nvmlInit", None)
            if init is not None and init() == 0:
                return cls(lib)
        return None

    def _handle(self, i: int):
        import ctypes

        h = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)))
        return h

    @staticmethod
    def _check(rc: int) -> None:
        if rc != 0:
            raise OSError(f"NVML error {rc}")

    def count(self) -> int:
        import ctypes

        n = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetCount_v2(ctypes.byref(n)))
        return n.value

    def name(self, i: int) -> str:
        import ctypes

        buf = ctypes.create_string_buffer(96)
        self._check(self.lib.nvmlDeviceGetName(self._handle(i), buf, ctypes.c_uint(96)))
        return buf.value.decode(errors="replace")

    def memory(self, i: int) -> tuple[int, int]:
        """(total, free) bytes; total without the driver's reserve where NVML says it (v2), as CUDA reports it."""
        import ctypes

        class MemoryV2(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                        ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

        class Memory(ctypes.Structure):
            _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

        v2 = getattr(self.lib, "nvmlDeviceGetMemoryInfo_v2", None)
        if v2 is not None:
            m2 = MemoryV2(version=ctypes.sizeof(MemoryV2) | (2 << 24))
            if v2(self._handle(i), ctypes.byref(m2)) == 0:
                return m2.total - m2.reserved, m2.free
        m = Memory()
        self._check(self.lib.nvmlDeviceGetMemoryInfo(self._handle(i), ctypes.byref(m)))
        return m.total, m.free

    def capability(self, i: int) -> tuple[int, int]:
        import ctypes

        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvmlDeviceGetCudaComputeCapability(self._handle(i), ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def close(self) -> None:
        try:
            self.lib.nvmlShutdown()
        except (AttributeError, OSError):
            pass


def visible_indices(count: int, environ=None) -> list[int] | None:
    """The NVML indices CUDA will see, in CUDA's order (CUDA_VISIBLE_DEVICES), or None when it names devices by
    UUID/MIG id (then NVML indices cannot be mapped here: measure in a child process)."""
    env = os.environ if environ is None else environ
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            break
        if not item.lstrip("-").isdigit():
            return None
        i = int(item)
        if i < 0 or i >= count:  # CUDA stops at the first invalid entry
            break
        out.append(i)
    return out


def gpus_from_nvml(nvml, environ=None) -> tuple[Gpu, ...] | None:
    """The visible GPUs with free memory, read through NVML (pure over the `nvml` object); None: cannot map."""
    idx = visible_indices(nvml.count(), environ)
    if idx is None:
        return None
    gpus = []
    for i in idx:
        total, free = nvml.memory(i)
        gpus.append(Gpu(name=nvml.name(i), total_gib=total / 2**30, capability=tuple(nvml.capability(i)),
                        free_gib=free / 2**30))
    return tuple(gpus)


_CHILD = """import json, torch
out = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append({"name": torch.cuda.get_device_name(i), "total_gib": total / 2**30,
                    "capability": list(torch.cuda.get_device_capability(i)), "free_gib": free / 2**30})
print(json.dumps(out))
"""


def gpus_from_child(timeout: float = 120) -> tuple[Gpu, ...] | None:
    """Measure in a child process (its CUDA context ends with it); None if the child fails."""
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=timeout)
        rows = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    if rows is None:
        return None
    return tuple(Gpu(r["name"], r["total_gib"], tuple(r["capability"]), r["free_gib"]) for r in rows)


def _cuda_build() -> bool:
    """Could torch here use a GPU at all (a CUDA/ROCm build)? Importing torch opens no CUDA context."""
    import torch

    return bool(getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None))


def local_gpus_without_context(load_nvml=None, child=None, cuda_build=None) -> tuple[tuple[Gpu, ...], str]:
    """(GPUs with free memory, how they were measured: "nvml", "child process" or "none"), opening no CUDA
    context in this process: NVML, else a child process (only with a CUDA build of torch), else no GPU."""
    load_nvml, child, cuda_build = load_nvml or Nvml.load, child or gpus_from_child, cuda_build or _cuda_build
    nvml = load_nvml()
    if nvml is not None:
        try:
            gpus = gpus_from_nvml(nvml)
        except OSError:
            gpus = None
        finally:
            nvml.close()
        if gpus is not None:
            return gpus, "nvml"
    gpus = child() if cuda_build() else None
    if gpus is not None:
        return gpus, "child process"
    return (), "none"


def detect(force_cpu: bool = False, free_memory: bool = False) -> Hardware:
    """This machine. `free_memory` (launcher, `plan`, `env`) also measures each GPU's free memory, without a
    CUDA context in this process (NVML, else a child process); training processes do not ask for it."""
    topo = process_topology()
    gpus: tuple[Gpu, ...] = ()
    if not force_cpu and free_memory:
        gpus, _how = local_gpus_without_context()
    elif not force_cpu:
        import torch

        if torch.cuda.is_available():
            gpus = tuple(
                Gpu(
                    name=torch.cuda.get_device_name(i),
                    total_gib=torch.cuda.get_device_properties(i).total_memory / 2**30,
                    capability=torch.cuda.get_device_capability(i),
                )
                for i in range(torch.cuda.device_count())
            )
    strategy = None
    if topo["world_size"] > 1:
        try:
            strategy = strategy_from_env()
        except ImportError:
            strategy = "ddp"
    return Hardware(kind="cuda" if gpus else "cpu", gpus=gpus, ram_gib=_ram_gib(), strategy=strategy, **topo)
