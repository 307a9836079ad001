"""Quiet, honest output: one status line per stage from the first second, and no library noise.

`stage("loading the model")` logs `[loraforge]  12.3 s  loading the model` (seconds since the command
started; stderr) the moment a stage begins, so a slow first start on a fresh machine (imports from a
cold disk, caches being built) shows what it is doing instead of sitting silent. `silence_noise()`
drops messages that say nothing to the user: matplotlib's "generated new fontManager" (its INFO log),
and DeepSpeed's "Setting accelerator to CPU ... unable to detect it" warning, which DeepSpeed emits
at import on every machine without a GPU (its logger resets its level at import, so a filter drops
that one message). Nothing else of DeepSpeed's is filtered.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import loraforge

_NOISE = ("Setting accelerator to CPU",)
_started: float | None = None
IMPORTS: dict[str, float] = {}  # library -> seconds its first import took in this process


def process_start_time() -> float:
    """When this process started (epoch seconds): from /proc on Linux, else when loraforge was imported."""
    global _started
    if _started is not None:
        return _started
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        _started = boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        _started = loraforge.IMPORTED_AT
    return _started


def enabled() -> bool:
    return os.environ.get("LORAFORGE_STATUS", "1") != "0" and int(os.environ.get("RANK", "0") or 0) == 0


def stage(what: str) -> None:
    """One line, at once: the seconds since the command started and what begins now (writer rank only),
    through the `loraforge` logger (the CLI shows it on stderr as `[loraforge]  12.3 s  what`)."""
    if enabled():
        logging.getLogger("loraforge").info("%5.1f s  %s", max(0.0, time.time() - process_start_time()), what)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def silence_noise() -> None:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" is INFO
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNoise) for f in ds.filters):
        ds.addFilter(_DropNoise())


def timed_import(name: str):
    """Import `name`, recording how long its first import took (the cold-start breakdown)."""
    if name in sys.modules:
        return sys.modules[name]
    t = time.time()
    module = __import__(name)
    IMPORTS[name] = round(time.time() - t, 2)
    return module


def format_stages(stages: dict) -> str:
    """'imports 6.2, data and plan 0.3, ...' from {stage: seconds since the command at its end}."""
    parts, before = [], 0.0
    for name, at in stages.items():
        parts.append(f"{name.replace('_', ' ')} {at - before:.1f}")
        before = at
    return ", ".join(parts)
