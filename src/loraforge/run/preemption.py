"""Preemption and time limits: on SIGUSR1 (or SIGTERM) finish the current optimizer step, save a complete
checkpoint, and exit cleanly with EXIT_PREEMPTED, so that a requeued job resumes where this one stopped.

The signal handler only sets a flag. At the end of every optimizer step all ranks all-reduce that flag
(MAX), so every rank stops after the same step even if the signal reached them at different moments (or
reached only one of them). The Trainer then writes the checkpoint through loraforge's crash-safe
`_save_checkpoint`; `exit_if_preempted` writes `preempted.json` in the run directory, tears the process
group down (barrier + destroy_process_group: torch + gloo can abort a rank at interpreter exit otherwise)
and exits with EXIT_PREEMPTED. The sbatch script (slurm.py) reads `preempted.json` to decide to requeue.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from loraforge.checkpoints import latest_complete
from loraforge.rundir import CHECKPOINTS_DIR, PREEMPTED_FILE, write_json

log = logging.getLogger("loraforge")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (a requeue resumes the run)
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopOnSignal(TrainerCallback):
    """Install handlers for USR1/TERM; after the optimizer step in progress, save and stop (all ranks agree)."""

    def __init__(self, signals: tuple[str, ...] = STOP_SIGNALS):
        self.requested: str | None = None  # name of the signal received by this process
        self.stopped_at: int | None = None  # the step after which every rank stopped
        self.previous: dict = {}  # signal -> the handler it replaced (put back by restore())
        if threading.current_thread() is threading.main_thread():
            for name in signals:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            # no logging here: a handler may run while the logging lock is held
            os.write(2, f"[loraforge] {self.requested} received: stopping after the current optimizer step\n".encode())

    def _agreed(self, args) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per optimizer step)."""
        local = self.requested is not None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        import torch

        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agreed(args):
            self.stopped_at = state.global_step
            if state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
        return control


def exit_if_preempted(trainer, stop: StopOnSignal, run_dir: Path) -> None:
    """After `trainer.train()`: if training stopped on a signal before the end, mark it and exit;
    otherwise put the previous signal handlers back and return."""
    state = trainer.state
    if stop.stopped_at is None or state.global_step >= state.max_steps:
        stop.restore()
        return

    last = latest_complete(Path(run_dir) / CHECKPOINTS_DIR)
    if trainer.is_world_process_zero():
        record = {"signal": stop.requested or "(another rank)", "step": state.global_step,
                  "max_steps": state.max_steps, "checkpoint": str(last) if last else None, "time": time.time(),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}
        write_json(Path(run_dir) / PREEMPTED_FILE, record)
        log.info("preempted after step %d of %d; checkpoint %s; exiting with code %d (a requeue resumes)",
                 state.global_step, state.max_steps, last, EXIT_PREEMPTED)
    teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(EXIT_PREEMPTED)


def teardown() -> None:
    """Leave the process group explicitly (barrier, then destroy): gloo may abort a rank at exit otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
