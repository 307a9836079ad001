"""Decisions, as pure functions of numbers: batch split, precision, sequence length.

The global batch (sequences per optimizer step over all processes) is what the recipe asks for; the
planner splits it into micro-batch x gradient accumulation x world size, exactly when it can, and
says so plainly when it cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from loraforge.plan import gpu_pin
from loraforge.plan.arch import check_setup
from loraforge.plan.arch import notes as arch_notes
from loraforge.plan.memory import GIB, MemoryEstimate, TrainSetup, estimate, preference_notes
from loraforge.plan.strategy import check_supported, launched_strategy
from loraforge.recipe_rules import keeps_reference_adapter


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
    # From the memory model (None when the architecture is not modelled)
    memory: dict | None = None  # MemoryEstimate.to_dict()
    budget_gib: float | None = None
    fits: bool | None = None
    suggestions: tuple[str, ...] = ()
    # How a micro-batch runs: its samples packed into rows of max_seq_length (batching.py), `rows_per_forward`
    # rows per forward/backward pass (None: all at once), the loss through trl's fused head or a plain one.
    rows_per_forward: int | None = None
    loss_head: str = "fused"

    def memory_dict(self) -> dict:
        m = self.memory or {}
        return {
            "predicted_peak_gib": m.get("predicted_peak_gib"),
            "budget_gib": None if self.budget_gib is None else round(self.budget_gib, 2),
            "fits": self.fits,
            "breakdown": m.get("breakdown_gib"),
            "memory_model": {k: m[k] for k in ("tensor_peak_gib", "peak_phase") if k in m} or None,
            "suggestions": list(self.suggestions),
        }

    def to_dict(self) -> dict:
        return self._base_dict() | self.memory_dict()

    def _base_dict(self) -> dict:
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
            "rows_per_forward": self.rows_per_forward,
            "loss_head": self.loss_head,
            "precision": asdict(self.precision) | {"label": self.precision.label},
            "notes": list(self.batch.notes) + list(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# The solver: micro-batch, accumulation, sequence length and checkpointing under a memory budget
# --------------------------------------------------------------------------------------------------


def micro_batch_candidates(global_batch: int, world_size: int, micro: int | None = None, accum: int | None = None) -> list[int]:
    """Micro-batches to try, largest first: the divisors of the per-process share, so that accumulation is whole
    and the global batch exact."""
    if micro is not None:
        return [micro]
    share = global_batch // world_size if global_batch % world_size == 0 else max(1, round(global_batch / world_size))
    if accum is not None:
        return [max(1, round(share / accum))]
    return sorted(_divisors(share), reverse=True)


def seq_candidates(requested: int | str, longest_sample: int, model_max: int | None, floor: int = 128) -> list[int]:
    """Sequence lengths to try, longest first: the recipe's own, or for `auto` the longest sample (rounded up to
    64, capped by the model) and then halvings, which truncate the longest samples."""
    if requested != "auto":
        return [int(requested)]
    start, _ = choose_seq_length("auto", longest_sample, model_max)
    out = [start]
    x = 1 << (start.bit_length() - 1)
    if x == start:
        x //= 2
    while x >= floor:
        out.append(x)
        x //= 2
    return out


def truncated_share(lengths: list[int] | None, seq: int) -> float | None:
    if not lengths:
        return None
    return truncation_report(lengths, seq)[1]


@dataclass(frozen=True)
class Solution:
    batch: BatchPlan
    seq_len: int
    gradient_checkpointing: bool
    estimate: object  # memory.MemoryEstimate
    fits: bool
    budget_gib: float
    notes: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()


def fsdp_qlora_load_bytes(shape, setup) -> int | None:
    """FSDP + QLoRA: the bytes each GPU holds while loading, before FSDP shards anything, or None when the
    load is not that case. accelerate skips RAM-efficient (rank-0) loading for 4-bit models and transformers
    excludes quantized models from it, so every rank quantizes the whole base on its own GPU (4-bit linears,
    quantization constants, the rest upcast to fp32 by peft) before `fully_shard` splits it."""
    if setup.quant != "4bit" or setup.strategy != "fsdp" or setup.world_size <= 1:
        return None
    whole = estimate(shape, setup.with_(world_size=1, strategy="single"))
    b = whole.breakdown
    return b["base_weights"] + b["quant_constants"] + b.get("cuda_context", 0)


def peak_estimate(shape, setup):
    """memory.estimate, plus the load-time peak where loading needs more than a step (FSDP + QLoRA)."""
    est = estimate(shape, setup)
    load = fsdp_qlora_load_bytes(shape, setup)
    if load is None or load <= est.peak:
        return est
    note = (f"FSDP + QLoRA loads the whole 4-bit base on every GPU before sharding it ({load / GIB:.1f} GiB), more "
            f"than a training step needs ({est.peak_gib:.1f} GiB): the load is the peak")
    context = est.breakdown.get("cuda_context", 0)
    breakdown = {"fsdp_qlora_load": load - context}
    if context:
        breakdown["cuda_context"] = context
    return MemoryEstimate(breakdown, load - context, "load", list(est.notes) + [note])


def _first_fit(shape, setup, seqs: list[int], gcs: list[bool], micros: list[int], budget: float):
    """(micro-batch, sequence, checkpointing, estimate) of the first setting within `budget` bytes, in the order of
    preference (the longest sequence, then no checkpointing, then the largest micro-batch); None if none fits."""
    for seq in seqs:
        for gc in gcs:
            for mb in micros:
                est = peak_estimate(shape, setup.with_(micro_batch=mb, seq_len=seq, gradient_checkpointing=gc))
                if est.peak <= budget:
                    return mb, seq, gc, est
    return None


def _solve_notes(chosen, fits: bool, seqs: list[int], micros: list[int], budget_gib: float, lengths,
                 micro_batch: int | None, gradient_checkpointing: bool | None) -> list[str]:
    """What the plan says about the setting it chose: a shortened sequence, checkpointing chosen, the micro-batch
    that would not fit, or that nothing fits."""
    mb, seq, gc, est = chosen
    notes: list[str] = []
    if seq != seqs[0]:
        share = truncated_share(lengths, seq)
        cut = f"; truncation cuts {100 * share:.1f}% of the training tokens" if share is not None else ""
        notes.append(f"max_seq_length auto -> {seq}: {seqs[0]} does not fit in {budget_gib:.1f} GiB{cut}")
    if gradient_checkpointing is None:
        why = "needed to fit" if gc else "fits without"
        notes.append(f"gradient checkpointing auto -> {'on' if gc else 'off'} ({why})")
    if micro_batch is None and len(micros) > 1 and fits:
        bigger = [m for m in micros if m > mb]
        if bigger:
            notes.append(f"micro-batch {mb}: {min(bigger)} would need more than {budget_gib:.1f} GiB")
    if not fits:
        notes.append(
            f"does not fit: micro-batch {mb}, sequence {seq}, checkpointing {'on' if gc else 'off'} needs "
            f"{est.peak_gib:.1f} GiB per device, the budget is {budget_gib:.1f} GiB; not launching"
        )
    return notes


def solve(
    shape,
    setup,
    global_batch: int,
    budget_gib: float,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    gradient_checkpointing: bool | None = None,
    seqs: list[int] | None = None,
    lengths: list[int] | None = None,
) -> Solution:
    """The first setting that fits `budget_gib`, in this order of preference: the longest allowed sequence, then
    no gradient checkpointing, then the largest micro-batch. Accumulation = global / (micro x world) exactly.
    `setup` (memory.TrainSetup) carries everything else (quantization, LoRA, optimizer, world, strategy)."""
    world = setup.world_size
    seqs = seqs or [setup.seq_len]
    gcs = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    micros = micro_batch_candidates(global_batch, world, micro_batch, grad_accum)
    chosen = _first_fit(shape, setup, seqs, gcs, micros, budget_gib * GIB)
    fits = chosen is not None
    if not fits:  # report the smallest setting, and what would fit
        mb, seq, gc = micros[-1], seqs[-1], gcs[-1]
        chosen = (mb, seq, gc, peak_estimate(shape, setup.with_(micro_batch=mb, seq_len=seq, gradient_checkpointing=gc)))
    mb, seq, gc, est = chosen
    if micro_batch is not None or grad_accum is not None:
        batch = plan_batch(global_batch, world, micro_batch, grad_accum)
    else:
        batch = plan_batch(global_batch, world, max_micro_batch=mb)
    notes = _solve_notes(chosen, fits, seqs, micros, budget_gib, lengths, micro_batch, gradient_checkpointing)
    suggestions: tuple[str, ...] = ()
    if not fits:
        suggestions = tuple(suggest(shape, setup.with_(micro_batch=mb, seq_len=seq, gradient_checkpointing=True),
                                    budget_gib, lengths))
    return Solution(batch, seq, gc, est, fits, budget_gib, tuple(notes), suggestions)


def suggest(shape, setup, budget_gib: float, lengths: list[int] | None = None) -> list[str]:
    """What would fit when nothing does, each with its predicted GiB per device."""
    estimate = peak_estimate

    def gib(s) -> tuple[float, bool]:
        e = estimate(shape, s)
        return e.peak_gib, e.peak <= budget_gib * GIB

    out = []
    if setup.quant == "none" and not getattr(shape, "experts", 0):  # bitsandbytes cannot quantize 3-D experts
        g, ok = gib(setup.with_(quant="4bit"))
        out.append(f"QLoRA (quantization.mode: 4bit): {g:.1f} GiB per device{'' if ok else ', still too much'}")
    sharded = setup.strategy in ("fsdp", "zero3", "zero3-offload")
    if setup.world_size > 1 and not sharded:
        g, ok = gib(setup.with_(strategy="fsdp"))
        out.append(f"FSDP / ZeRO-3 over the {setup.world_size} GPUs (loraforge launch --strategy fsdp): "
                   f"{g:.1f} GiB per GPU{'' if ok else ', still too much'}")
    if setup.quant == "4bit" and setup.world_size > 1 and fsdp_qlora_load_bytes(shape, setup.with_(strategy="fsdp")):
        g, ok = gib(setup.with_(quant="none", strategy="zero3"))
        out.append(f"LoRA on a 16-bit base with ZeRO-3 (quantization.mode: none, --strategy zero3; loads sharded "
                   f"under zero.Init): {g:.1f} GiB per GPU{'' if ok else ', still too much'}")
    sharding = "fsdp" if setup.strategy in ("single", "ddp", "zero2") else setup.strategy
    seq = setup.seq_len
    found = False
    while seq >= min(512, setup.seq_len) and not found:  # more GPUs; if none suffice, with shorter sequences too
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            if n <= setup.world_size:
                continue
            wider = setup.with_(world_size=n, strategy=sharding, seq_len=seq)
            how = "FSDP" if sharding == "fsdp" else sharding
            if fsdp_qlora_load_bytes(shape, wider) and not gib(wider)[1]:
                # a 4-bit base loads whole on every GPU: past that, a 16-bit base that ZeRO-3 loads sharded
                wider, how = wider.with_(quant="none", strategy="zero3"), "ZeRO-3 on a 16-bit base (quantization.mode: none)"
            g, ok = gib(wider)
            if ok:
                shorter = "" if seq == setup.seq_len else f" and data.max_seq_length {seq}"
                out.append(f"more GPUs: {n} GPUs with {how}{shorter}, {g:.1f} GiB each")
                found = True
                break
        seq //= 2
    s = setup.seq_len // 2
    while s >= 128:
        g, ok = gib(setup.with_(seq_len=s))
        if ok:
            share = truncated_share(lengths, s)
            cut = f", truncating {100 * share:.1f}% of the tokens" if share is not None else ""
            out.append(f"shorter sequences: data.max_seq_length {s} fits ({g:.1f} GiB{cut})")
            break
        s //= 2
    if setup.optimizer in ("adamw_torch", "adamw_torch_fused"):
        g, ok = gib(setup.with_(optimizer="paged_adamw_8bit"))
        if ok:
            out.append(f"an 8-bit optimizer (training.optimizer: paged_adamw_8bit): {g:.1f} GiB")
    return out


CPU_EXECUTION_NOTE = (
    "CPU: each step's samples are packed into rows of max_seq_length tokens and run one row per forward "
    "(memory of one full-length sample; a CPU is no faster with more rows at once)"
)


def choose_loss_head(requested: str, cpu: bool) -> str:
    """The recipe's choice, or for auto: the plain head on the CPU, trl's fused head on GPUs."""
    if requested != "auto":
        return requested
    return "plain" if cpu else "fused"


def execution(batch: BatchPlan, training, cpu: bool) -> tuple[BatchPlan, int, str, tuple[str, ...]]:
    """How the micro-batches run: (batch split, rows per forward, loss head, notes). On the CPU the whole
    per-process share of the step is one micro-batch (more samples per pack, fewer rows) unless the recipe
    fixed the split, and one row runs per forward: memory is bounded by one row instead. On GPUs the split
    is the memory model's and a micro-batch runs in one forward."""
    head = choose_loss_head(training.loss_head, cpu)
    if not cpu:
        return batch, batch.micro_batch_size, head, ()
    cpu_batch = plan_batch(training.global_batch_size, batch.world_size, *recipe_split(training), max_micro_batch=10**9)
    return cpu_batch, 1, head, (CPU_EXECUTION_NOTE,)


def setup_for(recipe, precision: Precision, hw, strategy: str, seq_len: int = 512):
    """The memory model's view of what the trainer will run for `recipe` on `hw`."""
    lora, q = recipe.lora, recipe.quantization
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    attn = recipe.model.attn_implementation
    return TrainSetup(
        micro_batch=1,
        seq_len=seq_len,
        gradient_checkpointing=False,
        quant=q.mode,
        double_quant=q.double_quant,
        lora_r=lora.r,
        lora_targets=targets,
        lora_dropout=lora.dropout,
        optimizer=recipe.training.optimizer,
        precision=precision.label,
        device="cpu" if precision.use_cpu else "cuda",
        attn="sdpa" if attn == "auto" else attn,
        packing=recipe.data.packing,
        world_size=hw.world_size,
        strategy=strategy,
        **preference_setup(recipe),
    )


def preference_setup(recipe) -> dict:
    """The TrainSetup keys of a preference step: the objective (training.method), the DPO reference (a forward
    per step, or log-probs precomputed before training) and whether trl's frozen "ref" adapter stays loaded."""
    method = recipe.training.method
    if method == "sft":
        return {}
    precompute = method == "dpo" and recipe.preference is not None and recipe.preference.precompute_reference
    reference = "none" if method == "orpo" else "precomputed" if precompute else "per_step"
    return {"objective": method, "reference": reference, "ref_adapter": keeps_reference_adapter(recipe)}


def plan_with_memory(recipe, hw, precision: Precision, strategy: str, shape, longest_sample: int,
                     model_max: int | None, lengths: list[int] | None = None) -> Plan:
    """The plan from the memory model: what fits `hw`'s budget, keeping the recipe's global batch."""
    t = recipe.training
    check_setup(shape, recipe.quantization.mode, recipe.lora.target_modules, recipe.lora.dropout,
                recipe.model.attn_implementation)
    seqs = seq_candidates(recipe.data.max_seq_length, longest_sample, model_max)
    notes = arch_notes(shape)
    if recipe.data.max_seq_length == "auto":
        notes.append(f"max_seq_length auto: longest sample {longest_sample} tokens" if lengths
                     else f"max_seq_length auto: no data read, starting from the model's context ({seqs[0]})")
    # on the CPU an SFT step runs one row per forward: that is what memory must hold; a preference step runs its
    # micro-batch's pairs in one forward on every device
    setup = setup_for(recipe, precision, hw, strategy)
    cpu = precision.use_cpu and not setup.preference
    micro, accum = recipe_split(t)
    sol = solve(
        shape,
        setup,
        t.global_batch_size,
        hw.budget_gib,
        micro_batch=1 if cpu else micro,
        grad_accum=None if cpu else accum,
        gradient_checkpointing=None if t.gradient_checkpointing == "auto" else bool(t.gradient_checkpointing),
        seqs=seqs,
        lengths=lengths,
    )
    if recipe.lora.use_dora:
        notes.append("DoRA is not in the memory model: it needs more than predicted")
    if setup.preference:
        chosen = setup.with_(micro_batch=sol.batch.micro_batch_size, seq_len=sol.seq_len)
        notes += ["memory model: " + n for n in preference_notes(chosen)]
    batch, rows, head, run_notes = execution(sol.batch, t, cpu)
    if head == "plain" and not cpu:
        run_notes += ("loss_head plain on a GPU: the memory model assumes the fused head; the plain one also holds "
                      "labelled tokens x vocabulary x 8 bytes",)
    return Plan(
        batch=batch, precision=precision, max_seq_length=sol.seq_len, gradient_checkpointing=sol.gradient_checkpointing,
        strategy=strategy, notes=tuple(notes) + sol.notes + run_notes, memory=sol.estimate.to_dict(), budget_gib=sol.budget_gib,
        fits=sol.fits, suggestions=sol.suggestions, rows_per_forward=rows, loss_head=head,
    )


def unfit_message(plan: dict) -> str:
    """The one message for a plan that does not fit (`Plan.to_dict()` or `loraforge plan`'s dict): what was
    tried, what it needs against the budget, and what would fit."""
    head = (f"does not fit: micro-batch {plan['micro_batch_size']}, sequence {plan['max_seq_length']}, checkpointing "
            f"{'on' if plan['gradient_checkpointing'] else 'off'} needs {plan.get('predicted_peak_gib') or 0:.1f} GiB "
            f"per device; the budget is {plan.get('budget_gib') or 0:.1f} GiB")
    tips = plan.get("suggestions") or []
    alts = "; ".join(tips) if tips else "no smaller setting fits; use QLoRA, more GPUs, FSDP/ZeRO-3 or shorter sequences"
    return f"{head}. What would fit: {alts} (see `loraforge plan`)"


FSDP_ON_CPU_NOTE = "on CPU, accelerate runs FSDP as plain DDP: the weights are not sharded here (a GPU run is)"


def recipe_split(training) -> tuple[int | None, int | None]:
    """The recipe's micro-batch and gradient accumulation; None where it says auto (the planner chooses)."""
    return (None if training.micro_batch_size == "auto" else training.micro_batch_size,
            None if training.gradient_accumulation_steps == "auto" else training.gradient_accumulation_steps)


def truncation_report(lengths: list[int], max_len: int) -> tuple[int, float]:
    """How many samples exceed `max_len`, and the share of all tokens truncation would cut."""
    over = [n for n in lengths if n > max_len]
    total = sum(lengths)
    cut = sum(n - max_len for n in over)
    return len(over), (cut / total if total else 0.0)


def make_plan(recipe, hw, longest_sample: int, model_max: int | None, shape=None, lengths=None) -> Plan:
    """The plan. With the model's shape (memory.ModelShape) the memory model chooses micro-batch, accumulation,
    sequence length and checkpointing for `hw`'s budget; without it, a split of the global batch only."""
    precision = choose_precision(hw.kind == "cuda", hw.bf16, recipe.model.dtype)
    strategy = launched_strategy(hw)
    check_supported(strategy, recipe.quantization.mode)
    if shape is not None:
        plan = plan_with_memory(recipe, hw, precision, strategy, shape, longest_sample, model_max, lengths)
    else:
        plan = plan_without_memory(recipe, hw, precision, strategy, longest_sample, model_max)
    notes = [FSDP_ON_CPU_NOTE] if strategy == "fsdp" and hw.kind == "cpu" else []
    pin = gpu_pin.pin_note()
    if pin is None and hw.world_size == 1 and len(getattr(hw, "gpus", ()) or ()) > 1:
        pin = (f"one process with {len(hw.gpus)} GPUs visible: training uses one GPU (loraforge pins GPU 0 before "
               "CUDA starts); use `loraforge launch` to train on all of them")
    notes += [pin] if pin else []
    return replace(plan, notes=plan.notes + tuple(notes)) if notes else plan


def plan_without_memory(recipe, hw, precision: Precision, strategy: str, longest_sample: int,
                        model_max: int | None) -> Plan:
    """For an architecture the memory model does not know: the recipe's split of the global batch, its sequence
    length, and checkpointing for quantized runs only."""
    t = recipe.training
    batch = plan_batch(t.global_batch_size, hw.world_size, *recipe_split(t))
    seq, notes = choose_seq_length(recipe.data.max_seq_length, longest_sample, model_max)
    if t.gradient_checkpointing == "auto":
        gc = recipe.quantization.mode != "none"
        notes.append(f"gradient checkpointing auto -> {'on' if gc else 'off'}")
    else:
        gc = bool(t.gradient_checkpointing)
    batch, rows, head, run_notes = execution(batch, t, precision.use_cpu)
    return Plan(batch=batch, precision=precision, max_seq_length=seq, gradient_checkpointing=gc, strategy=strategy,
                notes=tuple(notes) + run_notes, rows_per_forward=rows, loss_head=head)
