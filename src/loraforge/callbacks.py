"""Trainer callbacks: metrics written to the run directory (main process only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsFile(TrainerCallback):
    """Append every log record (loss, learning rate, grad norm, eval loss...) to `metrics.jsonl`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.time()
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time_s": round(time.time() - self.start, 2)}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()})
        self.history.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
