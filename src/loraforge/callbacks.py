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


class NonFiniteGuard(TrainerCallback):
    """Stop (or skip the update) when the gradients of a step are NaN/inf.

    Checked just before the optimizer step, after DDP has averaged the gradients, so every rank sees
    the same values and takes the same decision (no rank is left waiting). A skipped step leaves the
    LoRA weights and optimizer state untouched: the gradients are dropped, so the optimizer ignores
    them. Under fp16, the gradient scaler already skips overflowing steps; the guard then only stops
    once more than `max_skipped` bad steps were seen in the run.
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10, checkpoint_root: Path | None = None):
        self.policy = policy
        self.max_skipped = max_skipped
        self.checkpoint_root = checkpoint_root
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            return
        step = state.global_step + 1
        self.skipped += 1
        if self.policy == "stop" or self.skipped > self.max_skipped:
            from .checkpoints import latest_complete
            from .errors import UserError

            last = latest_complete(self.checkpoint_root) if self.checkpoint_root else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise UserError(
                f"step {step}: the loss or gradients became NaN/inf (after {self.skipped} bad step(s)); stopped, "
                f"{kept}. Lower training.learning_rate, check the data, or set training.on_nonfinite: skip"
            )
        if args.fp16:
            return  # the GradScaler skips this step itself
        for p in model.parameters():
            p.grad = None
        import logging

        logging.getLogger("loraforge").warning("step %d: non-finite gradients, update skipped (%d so far)", step, self.skipped)


class ProgressBar(TrainerCallback):
    """One progress bar on the main process: steps, ETA, loss and tokens/s (instead of printed dicts)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4f}"
        if "tokens_per_second" in logs:
            self.postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
        if "eval_loss" in logs:
            self.postfix["eval"] = f"{logs['eval_loss']:.4f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def process_start_time() -> float:
    """When this process started (status.process_start_time)."""
    from .status import process_start_time as started

    return started()


class StartupTimer(TrainerCallback):
    """Seconds from the command (process start) to the end of the first optimizer step of this process:
    imports, data, model load, trainer set-up and one step."""

    def __init__(self):
        self.startup_s: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.startup_s is None:
            self.startup_s = time.time() - process_start_time()


def format_stages(stages: dict) -> str:
    """'imports 6.2, data and plan 0.3, ...' from {stage: seconds since the command at its end}."""
    parts, before = [], 0.0
    for name, at in stages.items():
        parts.append(f"{name.replace('_', ' ')} {at - before:.1f}")
        before = at
    return ", ".join(parts)
