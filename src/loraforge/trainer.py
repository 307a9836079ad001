"""trl's SFTTrainer with what loraforge adds: crash-safe checkpoints and richer step metrics.

- `_save_checkpoint`: staged in `checkpoints/.staging`, marked complete, renamed into place; old
  checkpoints rotated only afterwards (see checkpoints.py).
- `log`: every training log also carries `tokens_per_second` (real, non-padding tokens over all
  processes, since the previous log) and `peak_memory_gib` (CUDA allocated on a GPU, process RSS on
  the CPU), so the progress bar, metrics.jsonl, W&B and TensorBoard all see them.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from .checkpoints import STAGING, MARKER, checkpoint_estimate, ensure_free_space, latest_complete, rotate
from .errors import UserError


def peak_memory_gib() -> tuple[float, str]:
    """(peak GiB, what was measured): CUDA allocated on a GPU, the process's peak RSS on the CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_rss"  # KiB on Linux


def make_trainer_class():
    """Build the subclass lazily: importing trl is slow and not needed for plan/recipe work."""
    from trl import SFTTrainer

    class LoraforgeTrainer(SFTTrainer):
        _lf_last: tuple[float, int] | None = None

        def training_step(self, *args, **kwargs):
            if self._lf_last is None:
                self._lf_last = (time.time(), getattr(self, "_total_train_tokens", 0))
            return super().training_step(*args, **kwargs)

        def log(self, logs, start_time=None):
            if "loss" in logs and self._lf_last is not None:
                now, tokens = time.time(), getattr(self, "_total_train_tokens", 0)
                t0, n0 = self._lf_last
                if now > t0:
                    logs["tokens_per_second"] = (tokens - n0) / (now - t0)
                self._lf_last = (now, tokens)
                logs["peak_memory_gib"] = peak_memory_gib()[0]
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            root = Path(self.args.output_dir)
            staging = root / STAGING
            step = self.state.global_step
            final = root / f"checkpoint-{step}"
            if self.args.should_save:
                root.mkdir(parents=True, exist_ok=True)
                trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                ensure_free_space(root, checkpoint_estimate(trainable, latest_complete(root)))
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
            self.accelerator.wait_for_everyone()
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            except OSError as e:
                if self.args.should_save:
                    shutil.rmtree(staging, ignore_errors=True)
                if e.errno == errno.ENOSPC:
                    raise UserError(
                        f"{root}: the disk filled up while writing checkpoint-{step}; the previous checkpoint is "
                        "intact: free some space and run the same command again to resume"
                    ) from None
                raise
            finally:
                self.args.output_dir = str(root)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                written = staging / f"checkpoint-{step}"
                (written / MARKER).write_text(f"{step}\n")
                if final.exists():  # an incomplete leftover of an earlier crash at this very step
                    shutil.rmtree(final)
                os.replace(written, final)
                shutil.rmtree(staging, ignore_errors=True)
                rotate(root, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    return LoraforgeTrainer
