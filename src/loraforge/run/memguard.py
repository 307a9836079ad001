"""Runtime memory guard: a pre-flight step that backs off on out-of-memory on all ranks together (the
measured peak beside the prediction is memreport.py's).

`preflight(trainer, plan, ...)` runs the worst step the plan allows (micro-batch x max_seq_length tokens,
padded, every token in the loss) forward and backward on every rank before training starts, on the
unwrapped model, so there is no collective inside the step: a rank that runs out of memory cannot leave the
others waiting in a gradient all-reduce. The ranks then agree with one all-reduce (MAX) of their OOM flags;
if any failed, all shrink the micro-batch to the next divisor of their share, raise accumulation so that
micro x accumulation x world stays the global batch, and try again. The result is reported in the log and in
plan.json (`oom_guard`).

It runs on a GPU (where an OOM is an exception; on the CPU the kernel kills the process instead) and when
`LORAFORGE_SIMULATE_OOM` is set, e.g. `rank=1,min_micro_batch=2`: that rank raises torch.OutOfMemoryError in
the pre-flight for any micro-batch of 2 or more (how the 2-process CPU test exercises it).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import replace
from pathlib import Path

from loraforge.errors import UserError
from loraforge.rundir import PLAN_FILE, update_json

log = logging.getLogger("loraforge")
SIMULATE_ENV = "LORAFORGE_SIMULATE_OOM"


def _simulated(rank: int) -> int | None:
    """The smallest micro-batch at which this rank fakes an OOM, or None."""
    spec = os.environ.get(SIMULATE_ENV, "")
    if not spec:
        return None
    fields = dict(kv.split("=", 1) for kv in spec.split(",") if "=" in kv)
    if int(fields.get("rank", rank)) != rank:
        return None
    return int(fields.get("min_micro_batch", 1))


def next_micro_batch(micro: int, share: int) -> int | None:
    """The largest divisor of the per-process share below `micro` (keeps the global batch exact), or None."""
    smaller = [d for d in range(1, micro) if share % d == 0]
    return max(smaller) if smaller else None


def any_rank(flag: bool) -> bool:
    """True if `flag` holds on at least one rank (all-reduce MAX; no-op in one process). "On every rank" is
    `not any_rank(not flag)` (callbacks.py); each rank must reach this call, whatever its own flag."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# Allocation failures that are not torch.OutOfMemoryError: torch raises RuntimeError for cuBLAS / cuDNN handles and
# workspaces and for asynchronous CUDA errors; bitsandbytes' kernels report CUDA's "out of memory" string.
_OOM_MESSAGES = (
    "CUBLAS_STATUS_ALLOC_FAILED",  # "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS ERROR: Status 3",  # bitsandbytes' cuBLAS(Lt) check: status 3 = CUBLAS_STATUS_ALLOC_FAILED
    "CUDA error: out of memory",  # asynchronous form (no trailing period: accelerate's " out of memory." misses it)
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "Error out of memory",  # bitsandbytes: "Error %s at line %d in file %s" with cudaGetErrorString
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Is this exception an out-of-memory, whatever type it arrives as? torch.OutOfMemoryError; the messages
    accelerate's `should_reduce_batch_size` matches (CUDA/XPU/MPS/CPU allocators); cuBLAS / cuDNN / bitsandbytes
    allocation failures, which arrive as plain RuntimeError."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    from accelerate.utils.memory import should_reduce_batch_size

    if should_reduce_batch_size(exc):
        return True
    text = " ".join(str(a) for a in exc.args)
    return any(m in text for m in _OOM_MESSAGES)


def training_state_bytes(trainable_numel: int, param_bytes: int, optimizer: str, world_size: int,
                         strategy: str) -> int:
    """Bytes a real training step holds beside what one forward + backward allocates: the optimizer's state
    (AdamW: 2 moments per trainable weight; 8-bit optimizers: 1 byte each; SGD/Adafactor: ~none) and, under DDP
    with several processes, the gradient buckets (a flat copy of every trainable gradient, all-reduced in place)."""
    per = {"adamw_torch": 2 * param_bytes, "adamw_torch_fused": 2 * param_bytes, "paged_adamw_32bit": 2 * param_bytes,
           "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0, "sgd": 0}.get(optimizer, 2 * param_bytes)
    buckets = trainable_numel * param_bytes if strategy == "ddp" and world_size > 1 else 0
    return trainable_numel * per + buckets


def _probe(trainer, micro: int, seq: int, vocab: int, pad_id: int, checkpointing: bool, rank: int,
           reserve_bytes: int = 0) -> None:
    """One forward + backward of the largest batch the plan allows, with no collective inside, while holding
    `reserve_bytes` for what the real step also holds (optimizer state, DDP buckets: training_state_bytes)."""
    import torch

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if checkpointing and not getattr(base, "is_activation_checkpointing", False):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    device = next(p.device for p in model.parameters())
    reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device) if reserve_bytes else None  # noqa: F841
    if hasattr(trainer, "lf_probe"):  # the preference step (run/preference.py): two sequences a pair, its own loss
        trainer.lf_probe(micro, seq, vocab, pad_id, device)
        return
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    if micro > 1:  # a padded batch, as most real ones are: transformers then builds the attention mask
        mask[0, -1] = 0
        ids[0, -1] = pad_id
    model.train()
    with trainer.accelerator.autocast():
        out = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
    out.loss.backward()


def _install_simulated_oom(model, rank: int, rows_per_sample: int = 1) -> None:
    """With LORAFORGE_SIMULATE_OOM, this rank's training forward raises OOM for micro-batches at or above the
    threshold: in the pre-flight, and in the real training steps too (so a guard that did not take effect shows).
    A preference step's forward holds two rows (chosen, rejected) per sample of the micro-batch."""
    import torch

    at = _simulated(rank)
    if at is None or getattr(model, "_loraforge_simulated_oom", False):
        return

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        micro = None if ids is None else ids.shape[0] // rows_per_sample
        if module.training and torch.is_grad_enabled() and micro is not None and micro >= at:
            raise torch.OutOfMemoryError(f"simulated out of memory on rank {rank} at micro-batch {micro}")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model._loraforge_simulated_oom = True


def _cleanup(model) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def preflight(trainer, plan, hw, pad_id: int | None, run_dir: Path | None = None):
    """Run the pre-flight; returns the plan to train with (the same one, or a smaller micro-batch).

    Only where the model is whole on each rank before training (single process, DDP): FSDP / ZeRO-3 shard it
    when training starts."""
    if hw.kind != "cuda" and not os.environ.get(SIMULATE_ENV):
        return plan
    if plan.strategy not in ("single", "ddp"):
        return plan
    _install_simulated_oom(trainer.model, hw.rank, 2 if hasattr(trainer, "lf_probe") else 1)
    micro, attempts = _largest_micro_batch_that_fits(trainer, plan, hw, 0 if pad_id is None else pad_id)
    if micro == plan.batch.micro_batch_size:
        return plan
    new_plan = _shrunk_plan(plan, micro)
    _apply_to_trainer(trainer, new_plan)
    if run_dir is not None and hw.rank == 0 and (run_dir / PLAN_FILE).is_file():
        batch = new_plan.batch
        update_json(run_dir / PLAN_FILE, new_plan.to_dict() | {"oom_guard": {
            "attempts": attempts, "micro_batch_size": micro, "gradient_accumulation_steps": batch.gradient_accumulation_steps}})
    return new_plan


def _reserve_bytes(trainer, plan) -> int:
    """What the real step holds beside the probe's forward + backward: optimizer state, DDP buckets."""
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    optim = str(getattr(getattr(trainer.args, "optim", None), "value", None) or "adamw_torch")
    return training_state_bytes(sum(p.numel() for p in trainable), trainable[0].element_size() if trainable else 4,
                                optim, plan.batch.world_size, plan.strategy)


def _largest_micro_batch_that_fits(trainer, plan, hw, pad_id: int) -> tuple[int, list[dict]]:
    """Probe the plan's micro-batch on every rank, then smaller divisors of the share until no rank runs out of
    memory. Returns (micro-batch, the attempts as plan.json records them)."""
    import torch

    vocab = int(getattr(trainer.model.config, "vocab_size", 0) or 32000)
    batch = plan.batch
    micro, share = batch.micro_batch_size, batch.micro_batch_size * batch.gradient_accumulation_steps
    reserve = _reserve_bytes(trainer, plan)
    attempts = []
    while True:
        oom = False
        try:
            _probe(trainer, micro, plan.max_seq_length, vocab, pad_id, plan.gradient_checkpointing, hw.rank, reserve)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            oom = True
            log.warning("rank %d: out of memory at micro-batch %d (%s)", hw.rank, micro, str(e).splitlines()[0][:120])
        _cleanup(trainer.model)
        failed = any_rank(oom)  # every rank reaches this all-reduce, OOM or not
        attempts.append({"micro_batch_size": micro, "out_of_memory": failed, "this_rank": oom})
        if not failed:
            return micro, attempts
        smaller = next_micro_batch(micro, share)
        if smaller is None:
            raise UserError(
                f"out of memory even at micro-batch {micro} with max_seq_length {plan.max_seq_length}; shorten "
                "data.max_seq_length, turn on training.gradient_checkpointing, use QLoRA or more GPUs (see `loraforge plan`)"
            )
        micro = smaller


def _shrunk_plan(plan, micro: int):
    """The plan at micro-batch `micro`, accumulation raised so that the global batch stays exact (logged)."""
    batch = plan.batch
    world, share = batch.world_size, batch.micro_batch_size * batch.gradient_accumulation_steps
    accum = share // micro
    note = (f"OOM guard: micro-batch {batch.micro_batch_size} ran out of memory on at least one rank; all ranks use "
            f"micro-batch {micro} x accumulation {accum} x {world} = global batch {micro * accum * world}")
    log.warning(note)
    new_batch = replace(batch, micro_batch_size=micro, gradient_accumulation_steps=accum)
    rows = None if plan.rows_per_forward is None else min(plan.rows_per_forward, micro)
    return replace(plan, batch=new_batch, notes=plan.notes + (note,), rows_per_forward=rows)


def _apply_to_trainer(trainer, plan) -> None:
    """The trainer (already built) takes the new micro-batch, accumulation and rows per forward."""
    if getattr(trainer, "lf_rows_per_forward", None):
        trainer.lf_rows_per_forward = plan.rows_per_forward
    args = trainer.args
    args.per_device_train_batch_size = plan.batch.micro_batch_size
    args.per_device_eval_batch_size = plan.batch.micro_batch_size
    args.gradient_accumulation_steps = plan.batch.gradient_accumulation_steps
    trainer._train_batch_size = args.train_batch_size
