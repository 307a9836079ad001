"""Crash-safe checkpoints: staged, marked complete, renamed into place; only complete ones are resumed.

A checkpoint is written by the Trainer into `checkpoints/.staging/checkpoint-N`, gets a `.complete`
marker, and is then renamed to `checkpoints/checkpoint-N` (an atomic rename on one filesystem). Old
checkpoints are rotated only after the new one is in place, so `save_total_limit` never removes the
last good one. A crash at any point leaves either the previous checkpoint set or the new one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import UserError

STAGING = ".staging"
MARKER = ".complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_incomplete(root: str | Path) -> list[Path]:
    """Remove the staging area and any checkpoint directory without its completeness marker."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.name == STAGING or (p.is_dir() and _CKPT.match(p.name) and not (p / MARKER).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rotate(root: str | Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (the newest is always kept)."""
    if not keep:
        return
    ckpts = complete_checkpoints(root)
    for _, path in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(path).free


def ensure_free_space(root: str | Path, need: int) -> None:
    free = free_bytes(root)
    if free < need:
        raise UserError(
            f"{root}: not enough free disk for a checkpoint (need ~{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); "
            "free some space and run the same command again to resume from the last complete checkpoint"
        )


def checkpoint_estimate(trainable_params: int, previous: Path | None) -> int:
    """Bytes a checkpoint will take: the previous one's size, or adapter + 2 AdamW moments in fp32, plus margin."""
    if previous is not None and previous.is_dir():
        return int(dir_bytes(previous) * 1.1) + (8 << 20)
    return int(trainable_params * 4 * 3 * 1.2) + (16 << 20)
