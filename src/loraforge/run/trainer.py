"""`LoraTrainer`: trl's SFTTrainer with what loraforge adds: crash-safe checkpoints and richer step metrics.

Heavy (imports torch and trl at its top): run/session.py imports it in `training_libraries()`, the one place.

- `_save_checkpoint`: staged in `checkpoints/.staging`, marked complete, renamed into place; old
  checkpoints rotated only afterwards (see checkpoints.py).
- `log`: every training log also carries `tokens_per_second` (real, non-padding tokens over all
  processes, since the previous log) and `peak_memory_gib` (CUDA allocated on a GPU, process RSS on
  the CPU), so the progress bar, metrics.jsonl, W&B and TensorBoard all see them.
- `compute_loss`: batches come from batching.RowCollator (padding-free rows, pre-shifted labels). The
  loss is the summed next-token NLL over the step's loss tokens divided by their count over the whole
  step (all micro-batches, all processes), so any split of a step gives the same gradient. The LM head
  is either trl's chunked fused head (GPUs: never holds the full logits) or a plain one that projects
  only the positions that carry a label (the CPU: trl's tiles are recomputed in its backward and score
  every position off Triton; the plain head made the step 1.33x faster on SmolLM2-135M and 5x on a
  tiny model here, benchmarks/throughput.py; model/lmhead.py).
- `training_step`: a micro-batch of several rows can run as several forward/backward passes of
  `rows_per_forward` rows (gradients accumulated without DDP sync until the last), so that memory is
  bounded by one row of max_seq_length tokens whatever the number of samples in the step.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from trl import SFTTrainer

from loraforge.checkpoints import STAGING, checkpoint_estimate, ensure_free_space, latest_complete, rotate, write_marker
from loraforge.errors import UserError
from loraforge.model.lmhead import add_plain_lm_head, plain_head_supported
from loraforge.model.quant import (
    adapter_dtype,
    is_quantized,
    keep_adapter_dtype,
    optimizer_fallback,
    training_ready,
)
from loraforge.recipe_rules import MUTATING_INITS
from loraforge.run.batching import split_rows


def peak_memory_gib() -> tuple[float, str]:
    """(peak GiB, what was measured): CUDA allocated on a GPU, the process's peak RSS on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_rss"  # KiB on Linux


def fall_back_optimizer(targs) -> None:
    """A bitsandbytes optimizer without a kernel on this device becomes adamw_torch, with one line."""
    optim, note = optimizer_fallback(str(getattr(targs.optim, "value", targs.optim)),
                                     "cpu" if targs.use_cpu or not torch.cuda.is_available() else "cuda")
    if note:
        logging.getLogger("loraforge").warning(note)
        targs.optim = optim


def precision_label(targs) -> str:
    return "bf16" if getattr(targs, "bf16", False) else "fp16" if getattr(targs, "fp16", False) else "fp32"


class StagedCheckpoints:
    """Crash-safe checkpoints for any transformers Trainer (mixed in before it: LoraTrainer, the preference trainer):
    written into checkpoints/.staging, marked complete (sizes + checksums), renamed into place; old checkpoints
    rotated only then. Every rank takes part (ZeRO / FSDP save together)."""

    def _save_checkpoint(self, model, trial):
        """Written into checkpoints/.staging, marked complete (sizes + checksums), renamed into place; old
        checkpoints rotated only then. Every rank takes part (ZeRO / FSDP save together)."""
        root = Path(self.args.output_dir)
        step = self.state.global_step
        if self.args.should_save:
            self._lf_prepare_staging(root)
        self.accelerator.wait_for_everyone()
        self._lf_save_into_staging(model, trial, root, step)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._lf_publish(root, step)
        self.accelerator.wait_for_everyone()

    def _lf_prepare_staging(self, root: Path) -> None:
        """Enough free disk for one more checkpoint (or a one-line error), and an empty staging folder."""
        staging = root / STAGING
        root.mkdir(parents=True, exist_ok=True)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ensure_free_space(root, checkpoint_estimate(trainable, latest_complete(root)))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()

    def _lf_save_into_staging(self, model, trial, root: Path, step: int) -> None:
        """transformers' own checkpoint, written under the staging folder; a full disk leaves the previous one."""
        staging = root / STAGING
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

    def _lf_publish(self, root: Path, step: int) -> None:
        """Mark the staged checkpoint complete, rename it into place, then rotate the old ones."""
        staging = root / STAGING
        final = root / f"checkpoint-{step}"
        written = staging / f"checkpoint-{step}"
        write_marker(written, step)  # sizes + checksums of every file, then complete
        if final.exists():  # an incomplete leftover of an earlier crash at this very step
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate(root, self.args.save_total_limit)


class LoraTrainer(StagedCheckpoints, SFTTrainer):
    _lf_last: tuple[float, int] | None = None
    _lf_pending = None
    _lf_initial = None

    def __init__(self, *args, loss_head: str = "fused", rows_per_forward: int | None = None, **kwargs):
        model, targs = kwargs.get("model"), kwargs.get("args")
        if targs is not None:
            fall_back_optimizer(targs)
        if model is not None:
            training_ready(model)
        self.lf_adapter_dtype = adapter_dtype("4bit" if model is not None and is_quantized(model) else "none",
                                              precision_label(targs))
        with keep_adapter_dtype(model, self.lf_adapter_dtype) if model is not None else contextlib.nullcontext():
            super().__init__(*args, **kwargs)  # trl casts a quantized model's adapters to bf16: kept where fp32
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.lf_plain_head = loss_head == "plain" and plain_head_supported(base.config)
        if self.lf_plain_head:
            add_plain_lm_head(base)
        # DeepSpeed counts its own micro-steps per backward: never split a micro-batch under it
        self.lf_rows_per_forward = None if self.is_deepspeed_enabled else rows_per_forward
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's loss-token count

    # ------------------------------------------------------------------ OLoRA / PiSSA: a plain LoRA on disk

    def _lf_mutating_init(self):
        config = getattr(self.model, "peft_config", {}).get("default")
        return config is not None and config.init_lora_weights in MUTATING_INITS

    def save_model(self, output_dir=None, _internal_call=False):
        """The final adapter of an OLoRA/PiSSA run (which trained over W - B0A0) is written converted to a
        plain LoRA over the original base, so that eval, chat and merge load it like any other run."""
        if _internal_call or not self._lf_mutating_init() or self._lf_initial is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=self._lf_initial)
        self.accelerator.wait_for_everyone()

    def train(self, *args, **kwargs):
        if self._lf_mutating_init() and self.args.should_save and self._lf_initial is None:
            self._lf_save_initial_adapter()
        return super().train(*args, **kwargs)

    def _lf_save_initial_adapter(self) -> None:
        """The adapter as initialised (the same on a resume: the init is a deterministic QR/SVD of the base)."""
        self._lf_initial = tempfile.mkdtemp(prefix="loraforge-init-")
        config = self.model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        try:
            self.model.save_pretrained(self._lf_initial)
        finally:
            config.init_lora_weights = init

    # ------------------------------------------------------------------ the step, its loss and its metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._lf_last is None:
            self._lf_last = (time.time(), getattr(self, "_total_train_tokens", 0))
        if num_items_in_batch is None:  # a model without loss kwargs: this micro-batch's loss tokens, all ranks
            local = (inputs["shift_labels"] != -100).sum().to(self.args.device)
            num_items_in_batch = self.accelerator.gather(local.view(1)).sum() * self.current_gradient_accumulation_steps
        chunks = split_rows(inputs, self.lf_rows_per_forward) if self.lf_rows_per_forward else [inputs]
        total = None
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, chunk, num_items_in_batch)
            total = loss if total is None else total + loss
        self._lf_flush("train")  # once per micro-batch: ranks may run different numbers of chunks
        return total

    def prediction_step(self, *args, **kwargs):
        out = super().prediction_step(*args, **kwargs)
        self._lf_flush("eval")
        return out

    def _lf_flush(self, mode):
        """Gather the pending (loss tokens, top-1 hits, real tokens) of every process: metrics and throughput."""
        local, self._lf_pending = self._lf_pending, None
        if local is None:
            local = torch.zeros(3, dtype=torch.long, device=self.args.device)
        stats = self.accelerator.gather_for_metrics(local.view(1, 3)).view(-1, 3).sum(0)
        if stats[0] > 0:
            self._metrics[mode]["mean_token_accuracy"].append((stats[1] / stats[0]).item())
        if mode == "train":
            self._total_train_tokens += int(stats[2].item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("row_lengths").sum()
        inputs.pop("labels", None)
        inputs["use_cache"] = False
        if self.lf_plain_head:
            out = model(**inputs, lf_plain_head=True)
            nll, n_valid, n_correct = out["nll_sum"], out["n_valid"], out["n_correct"]
        else:
            out = model(**inputs, fused_lm_head=True)
            nll, n_valid, n_correct = -out.log_probs.sum(), out.label_mask.sum(), out.is_top1.sum()
        denom = n_valid if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(denom, device=nll.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients over the processes
        step = torch.stack([n_valid, n_correct, real.to(n_valid.device)]).detach().long()
        self._lf_pending = step if self._lf_pending is None else self._lf_pending + step
        if return_outputs:
            return loss, out
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._lf_last is not None:
            now, tokens = time.time(), getattr(self, "_total_train_tokens", 0)
            t0, n0 = self._lf_last
            if now > t0:
                logs["tokens_per_second"] = (tokens - n0) / (now - t0)
            self._lf_last = (now, tokens)
            logs["peak_memory_gib"] = peak_memory_gib()[0]
        super().log(logs, start_time)
