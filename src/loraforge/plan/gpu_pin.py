"""One training process on a machine with several GPUs uses exactly one of them.

Without a distributed launcher, transformers' TrainingArguments sets `n_gpu = torch.cuda.device_count()`
and wraps the model in nn.DataParallel when that is above 1 — which trl's SFTTrainer refuses, after the
data and the model are loaded. loraforge's one-process paths (`train`, `quickstart`, `launch --strategy
single`) therefore pin one GPU through CUDA_VISIBLE_DEVICES before anything initialises CUDA (bitsandbytes
queries CUDA at import time, so this runs first thing in `train.run`). Counting the GPUs uses NVML (through
torch's own helper), which opens no CUDA context. The pin is said in the plan's notes, with the way to use
all GPUs: `loraforge launch`.
"""

from __future__ import annotations

import os

_DISTRIBUTED = ("WORLD_SIZE", "LOCAL_RANK", "RANK")


def decide(environ: dict, gpu_count: int | None) -> tuple[str | None, str | None]:
    """(value for CUDA_VISIBLE_DEVICES or None to leave it, note for the plan or None). Pure.

    `gpu_count`: the GPUs this process would see (None: unknown, e.g. NVML missing)."""
    if any(environ.get(k) not in (None, "") for k in _DISTRIBUTED):
        return None, None  # a launcher started this rank: it owns the device assignment
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if len(ids) <= 1:
            return None, None  # the user chose one GPU (or none)
        return ids[0], (
            f"one process, CUDA_VISIBLE_DEVICES={visible}: training on {ids[0]} only (transformers would wrap "
            f"{len(ids)} GPUs in nn.DataParallel, which trl refuses); use `loraforge launch` to train on all of them"
        )
    if gpu_count is not None and gpu_count <= 1:
        return None, None
    many = f"{gpu_count} GPUs" if gpu_count else "several GPUs"
    return "0", (
        f"one process on a machine with {many}: training on GPU 0 only (CUDA_VISIBLE_DEVICES=0; transformers "
        "would wrap them in nn.DataParallel, which trl refuses); use `loraforge launch` to train on all of them"
    )


def visible_gpu_count() -> int | None:
    """GPUs visible to this process, counted through NVML without initialising CUDA; None if unknown."""
    try:
        import torch

        if not torch.cuda._is_compiled():
            return 0
        if torch.cuda.is_initialized():
            return torch.cuda.device_count()
        n = torch.cuda._device_count_nvml()
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None
    return n if n >= 0 else None


_NOTE: list[str] = []


def pin_single_process(environ=None) -> str | None:
    """Apply `decide` to this process (before CUDA initialises); returns the plan note, if any."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k) not in (None, "") for k in _DISTRIBUTED):
        return None
    value, note = decide(dict(environ), visible_gpu_count())
    if value is not None:
        try:
            import torch

            if torch.cuda._is_compiled() and torch.cuda.is_initialized():
                return None  # too late to pin; transformers will see every GPU (cannot happen in train.run)
        except ImportError:
            pass
        environ["CUDA_VISIBLE_DEVICES"] = value
    if note:
        _NOTE[:] = [note]
    return note


def pin_note() -> str | None:
    """The note of the pin applied in this process, for the plan."""
    return _NOTE[0] if _NOTE else None
