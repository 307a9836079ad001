"""Trainer callbacks: metrics written to the run directory (main process only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from loraforge.checkpoints import latest_complete
from loraforge.errors import UserError
from loraforge.run.memguard import any_rank
from loraforge.run.status import process_start_time as started


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


def _local(t):
    """The part of a tensor this rank holds: an FSDP2 DTensor's local shard, a ZeRO-3 partition, or itself."""
    if hasattr(t, "to_local"):
        return t.to_local()
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t


def deepspeed_step_state(optimizer) -> bool | None:
    """Under DeepSpeed: True if the engine skipped the step it already ran (its ZeRO optimizer found NaN/inf
    gradients or an invalid global norm: `overflow`, the same on every rank), False if it applied it; None if
    `optimizer` is not DeepSpeed's."""
    if optimizer is None or type(optimizer).__name__ != "DeepSpeedOptimizerWrapper":
        return None
    return bool(optimizer.step_was_skipped)


def _finite(tensors) -> bool:
    import torch

    tensors = [t for t in tensors if t is not None and t.numel()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class NonFiniteGuard(TrainerCallback):
    """Stop (or skip the update) when the gradients of a step are NaN/inf — the same decision on every rank.

    - single / DDP: checked just before the optimizer step, after DDP averaged the gradients (every rank sees
      the same values). A skipped step drops the gradients, so the optimizer leaves weights and state alone.
    - FSDP2: each rank holds only its gradient shard (DTensor): it checks its local shard, and one all-reduce
      (MIN) makes the decision global.
    - DeepSpeed: accelerate runs `engine.step()` inside `backward`, before this callback, and ZeRO keeps the
      gradients out of `p.grad`. The ZeRO optimizer itself discards a step whose gradients or global norm are
      NaN/inf (`overflow`, all-reduced); the guard reads that flag (counts a skip, or stops). If the engine
      applied the step (no clipping: no norm was computed), the guard checks the trainable weights instead
      and stops if they became non-finite — an applied update cannot be skipped.
    Under fp16 the gradient scaler already skips overflowing steps; the guard then only stops once more than
    `max_skipped` bad steps were seen in the run.
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10, checkpoint_root: Path | None = None):
        self.policy = policy
        self.max_skipped = max_skipped
        self.checkpoint_root = checkpoint_root
        self.skipped = 0

    def _stop(self, step: int, why: str = "the loss or gradients became NaN/inf"):
        last = latest_complete(self.checkpoint_root) if self.checkpoint_root else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise UserError(
            f"step {step}: {why} (after {self.skipped} bad step(s)); stopped, "
            f"{kept}. Lower training.learning_rate, check the data, or set training.on_nonfinite: skip"
        )

    def _must_stop(self, args) -> bool:
        """fp16: the loss scaler's overflow skips are normal; stop only past `max_skipped`."""
        if args.fp16:
            return self.skipped > self.max_skipped
        return self.policy == "stop" or self.skipped > self.max_skipped

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import logging

        step = state.global_step + 1
        params = [p for p in model.parameters() if p.requires_grad]
        ds_skipped = deepspeed_step_state(optimizer)
        if ds_skipped is not None:  # the engine has already stepped (or skipped)
            if ds_skipped:
                self.skipped += 1
                if self._must_stop(args):
                    self._stop(step)
                logging.getLogger("loraforge").warning(
                    "step %d: non-finite gradients, DeepSpeed skipped the update (%d so far)", step, self.skipped)
                return
            if any_rank(not _finite([_local(p) for p in params])):
                self.skipped += 1
                self._stop(step, "the LoRA weights became NaN/inf (DeepSpeed applied the update: no gradient "
                                 "clipping, so no global norm was checked)")
            return
        sharded = any(hasattr(p, "to_local") for p in params)
        grads = [_local(p.grad) if p.grad is not None else None for p in params]
        finite = _finite(grads)
        if sharded:
            finite = not any_rank(not finite)  # FSDP2: each rank checked its shard only: finite on every rank
        if finite:
            return
        self.skipped += 1
        if self._must_stop(args):
            self._stop(step)
        if args.fp16:
            return  # the GradScaler skips this step itself
        for p in model.parameters():
            p.grad = None
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
    return started()


class StartupTimer(TrainerCallback):
    """Seconds from the command (process start) to the end of the first optimizer step of this process:
    imports, data, model load, trainer set-up and one step."""

    def __init__(self):
        self.startup_s: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.startup_s is None:
            self.startup_s = time.time() - process_start_time()
