"""Measured memory beside the prediction, per rank: what each rank holds after loading and after the
strategy prepared the model, and the peak of the training steps (not of the pre-flight probe).

`memory.json` in the run directory:
- `after_load` / `after_prepare`: per rank, the bytes of the frozen and trainable parameters this rank
  stores (ZeRO-3: its partition `ds_tensor`; FSDP2: its local shard) — how sharding is seen on any device;
- `first_step` / `end`: per rank, the peak (CUDA: `max_memory_allocated` / `max_memory_reserved` since the
  reset after the pre-flight; CPU: the process's peak RSS, which cannot be reset), and their maximum
  (`max_allocated_gib`, `max_reserved_gib`, `measured_over_predicted` on CUDA, as report.py reads them);
- `before_training`: the CUDA peak of loading + pre-flight, recorded before the reset.
The run summary's peak is the largest over all ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from loraforge.rundir import MEMORY_FILE, write_json

log = logging.getLogger("loraforge")


def param_bytes(model, base: bool = False) -> dict:
    """Bytes of the parameters (and buffers) this rank actually stores, frozen and trainable apart
    (`base`: a freshly loaded base, whose parameters are all counted as frozen: LoRA freezes them next)."""
    frozen = trainable = 0
    for p in model.parameters():
        t = p
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the local partition; p itself is an empty placeholder
            t = p.ds_tensor
        elif hasattr(p, "to_local"):  # FSDP2 DTensor: this rank's shard
            t = p.to_local()
        n = t.numel() * t.element_size()
        if p.requires_grad and not base:
            trainable += n
        else:
            frozen += n
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"frozen_param_bytes": frozen, "trainable_param_bytes": trainable, "buffer_bytes": buffers}


def _gather(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (collective when distributed; one row otherwise)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [r.tolist() for r in rows]


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _peaks() -> list[float]:
    """[allocated GiB, reserved GiB] on CUDA; [peak RSS GiB, peak RSS GiB] on the CPU."""
    import torch

    if _cuda_in_use():
        return [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return [rss, rss]


def reset_after_preflight(report: "DeviceMemoryReport") -> None:
    """Record the peak of loading + pre-flight, then reset CUDA's peak counters so that the training steps'
    peak is measured on its own (on the CPU the peak RSS cannot be reset: it includes loading)."""
    import torch

    if _cuda_in_use():
        report.record("before_training", {"max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)},
                      collective=False)
        torch.cuda.reset_peak_memory_stats()


class DeviceMemoryReport(TrainerCallback):
    """Writes memory.json (rank 0) from every rank's numbers; every rank calls the collectives in step."""

    def __init__(self, plan, run_dir: Path, rank: int):
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.data: dict = {}
        self.ready = False  # set once the run directory is written: nothing lands in it before (a user error)

    # -- writing -----------------------------------------------------------------------------------
    def record(self, key: str, value, collective: bool = True) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.rank == 0 and self.ready and self.run_dir.is_dir():
            write_json(self.run_dir / MEMORY_FILE, self.data)

    def _bytes(self, key: str, model, base: bool = False) -> None:
        b = param_bytes(model, base)
        rows = _gather([b["frozen_param_bytes"], b["trainable_param_bytes"], b["buffer_bytes"]])
        self.record(key, {"per_rank": [
            {"rank": i, "frozen_param_bytes": int(r[0]), "trainable_param_bytes": int(r[1]), "buffer_bytes": int(r[2])}
            for i, r in enumerate(rows)
        ]})

    def after_load(self, model) -> None:
        self._bytes("after_load", model, base=True)

    def _peak(self, when: str) -> None:
        rows = _gather(_peaks())
        predicted = (self.plan.memory or {}).get("predicted_peak_gib") if getattr(self.plan, "memory", None) else None
        entry = {"per_rank": [{"rank": i, "peak_gib": round(r[0], 3), "reserved_gib": round(r[1], 3)}
                              for i, r in enumerate(rows)],
                 "measured": "cuda_allocated" if _cuda_in_use() else "process_rss",
                 "predicted_peak_gib": predicted}
        top = max(r[0] for r in rows)
        if _cuda_in_use():
            entry["max_allocated_gib"] = round(top, 3)
            entry["max_reserved_gib"] = round(max(r[1] for r in rows), 3)
            if predicted:
                entry["measured_over_predicted"] = round(top / predicted, 3)
            log.info("memory (%s): peak %.2f GiB allocated on the fullest of %d rank(s); predicted %s GiB",
                     when, top, len(rows), f"{predicted:.2f}" if predicted else "n/a")
        self.record(when, entry)

    def peak_gib(self) -> tuple[float, str]:
        """(peak GiB over all ranks, what was measured); collective."""
        top = max(r[0] for r in _gather(_peaks()))
        return top, "cuda_allocated" if _cuda_in_use() else "process_rss"

    # -- trainer hooks (called on every rank) --------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._bytes("after_prepare", model)

    def on_step_end(self, args, state, control, **kwargs):
        if "first_step" not in self.data:
            self._peak("first_step")

    def on_train_end(self, args, state, control, **kwargs):
        self._peak("end")
