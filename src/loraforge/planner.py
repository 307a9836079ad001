"""Decisions, as pure functions of numbers: batch split, precision, sequence length.

The global batch (sequences per optimizer step over all processes) is what the recipe asks for; the
planner splits it into micro-batch x gradient accumulation x world size, exactly when it can, and
says so plainly when it cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    requested_global_batch: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def exact(self) -> bool:
        return self.global_batch_size == self.requested_global_batch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(
    global_batch: int,
    world_size: int,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    max_micro_batch: int = 8,
) -> BatchPlan:
    """Split `global_batch` into micro x accum x world.

    `micro_batch` / `grad_accum` fixed by the recipe are kept; `None` means choose. Without a memory
    model the largest micro-batch <= `max_micro_batch` that divides the per-process share is chosen.
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError("global_batch and world_size must be >= 1")
    notes: list[str] = []
    per_process = global_batch / world_size
    if micro_batch is not None and grad_accum is not None:
        plan = BatchPlan(micro_batch, grad_accum, world_size, global_batch)
    elif micro_batch is not None:
        accum = max(1, round(per_process / micro_batch))
        plan = BatchPlan(micro_batch, accum, world_size, global_batch)
    elif grad_accum is not None:
        micro = max(1, round(per_process / grad_accum))
        plan = BatchPlan(micro, grad_accum, world_size, global_batch)
    elif global_batch % world_size == 0:
        share = global_batch // world_size
        micro = max(d for d in _divisors(share) if d <= max(1, max_micro_batch))
        plan = BatchPlan(micro, share // micro, world_size, global_batch)
    else:
        # Cannot split exactly over the processes: the nearest per-process share, at least 1.
        share = max(1, round(per_process))
        micro = max(d for d in _divisors(share) if d <= max(1, max_micro_batch))
        plan = BatchPlan(micro, share // micro, world_size, global_batch)
    if not plan.exact:
        notes.append(
            f"global batch {global_batch} cannot be split exactly over {world_size} process(es) with "
            f"micro-batch {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps}; "
            f"using {plan.global_batch_size} (set training.global_batch_size to a multiple of {world_size})"
        )
    return BatchPlan(plan.micro_batch_size, plan.gradient_accumulation_steps, world_size, global_batch, tuple(notes))


@dataclass(frozen=True)
class Precision:
    bf16: bool
    fp16: bool
    model_dtype: str  # float32 / bfloat16 / float16
    use_cpu: bool

    @property
    def label(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def choose_precision(on_gpu: bool, gpu_bf16: bool, requested_dtype: str = "auto") -> Precision:
    """bf16 on Ampere or newer, fp16 on older GPUs, fp32 on the CPU (trl's bf16 default fails there)."""
    if not on_gpu:
        dtype = "float32" if requested_dtype == "auto" else requested_dtype
        return Precision(bf16=False, fp16=False, model_dtype=dtype, use_cpu=True)
    if requested_dtype == "auto":
        requested_dtype = "bfloat16" if gpu_bf16 else "float16"
    if requested_dtype == "bfloat16" and not gpu_bf16:
        requested_dtype = "float16"
    return Precision(
        bf16=requested_dtype == "bfloat16",
        fp16=requested_dtype == "float16",
        model_dtype=requested_dtype,
        use_cpu=False,
    )


def choose_seq_length(requested: int | str, longest_sample: int, model_max: int | None) -> tuple[int, list[str]]:
    """The recipe's sequence length; `auto` = the longest sample rounded up to 64, capped by the model."""
    notes: list[str] = []
    cap = model_max if model_max and model_max > 0 else None
    if requested == "auto":
        length = max(64, -(-longest_sample // 64) * 64)
        if cap is not None and length > cap:
            length = cap
        notes.append(f"max_seq_length auto -> {length} (longest sample {longest_sample} tokens)")
        return length, notes
    return int(requested), notes


@dataclass(frozen=True)
class Plan:
    batch: BatchPlan
    precision: Precision
    max_seq_length: int
    gradient_checkpointing: bool
    strategy: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "micro_batch_size": self.batch.micro_batch_size,
            "gradient_accumulation_steps": self.batch.gradient_accumulation_steps,
            "world_size": self.batch.world_size,
            "global_batch_size": self.batch.global_batch_size,
            "requested_global_batch_size": self.batch.requested_global_batch,
            "global_batch_exact": self.batch.exact,
            "max_seq_length": self.max_seq_length,
            "gradient_checkpointing": self.gradient_checkpointing,
            "strategy": self.strategy,
            "precision": asdict(self.precision) | {"label": self.precision.label},
            "notes": list(self.batch.notes) + list(self.notes),
        }
