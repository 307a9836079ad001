"""One process's training session, as named stages.

    hardware -> run directory -> training libraries -> data + plan -> training arguments -> model + LoRA
    -> run files -> trainer -> train -> evaluate -> save -> report

Under `accelerate launch`, `torchrun` or `srun` every process runs these same stages and computes the same plan
from the same inputs; rank 0 writes the run directory. The stages are in this order for reasons a GPU run
depends on: the GPU is pinned before anything initialises CUDA; the data is read before any model loads (a bad
record stops in seconds); the training arguments exist before `from_pretrained` (they set each rank's device
and, under ZeRO-3, make loading partition the weights); the run directory is written only once data, plan and
model are all valid.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from loraforge.checkpoints import clean_incomplete, drop_damaged, latest_complete, write_manifest
from loraforge.data.pairs import prepare_preference
from loraforge.data.prepare import Prepared, prepare
from loraforge.errors import UserError
from loraforge.model.modeling import add_lora, base_placement, load_base_model
from loraforge.plan import flops
from loraforge.plan.gpu_pin import pin_single_process
from loraforge.plan.hardware import detect, process_topology
from loraforge.plan.planner import unfit_message
from loraforge.recipe import Recipe, dump_recipe
from loraforge.redact import redact
from loraforge.run.batching import RowCollator
from loraforge.run.launched import check_launched, launch_record
from loraforge.run.memguard import preflight
from loraforge.run.runlock import hold
from loraforge.run.saving import check_saved_adapter, save_adapter
from loraforge.run.sftconfig import sft_config
from loraforge.run.status import process_start_time, stage
from loraforge.rundir import (
    CHECKPOINTS_DIR,
    DONE_FILE,
    METRICS_FILE,
    PLAN_FILE,
    RECIPE_FILE,
    SAMPLES_FILE,
    SOURCE_FILE,
    VERSIONS_FILE,
    prepare_run_dir,
    read_json,
    update_json,
    write_json,
)
from loraforge.use.card import write_model_card
from loraforge.use.samples import compare_samples, final_samples
from loraforge.versions import library_versions

log = logging.getLogger("loraforge")


@dataclass
class RunResult:
    run_dir: Path
    trained: bool
    train_loss: float | None = None
    eval_loss: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    tokens_seen: int = 0  # real (non-padding) tokens, all processes
    tokens_per_second: float | None = None
    peak_memory_gib: float | None = None
    memory_measured: str | None = None  # cuda_allocated / process_rss
    predicted_peak_gib: float | None = None
    mfu: float | None = None  # model FLOPs utilisation (flops.py): GPU datasheet peak, or measured CPU peak
    flops_per_token: float | None = None  # model FLOPs of a LoRA step per real token
    peak_flops: float | None = None  # per device
    peak_source: str | None = None
    startup_s: float | None = None  # command -> end of the first optimizer step
    startup_stages: dict = field(default_factory=dict)  # seconds from the command to the end of each stage
    samples: list[dict] = field(default_factory=list)
    preference: dict | None = None  # training.method dpo/orpo: before/after scores (run/preference.py)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("run_dir", "trained", "samples")}
        out["wall_s"] = round(self.wall_s, 1)
        return out


class Clock:
    """Seconds from the command (process start) to the end of each stage: the run summary's start-up stages."""

    def __init__(self):
        self.t0 = time.time()
        self.started = process_start_time()
        self.stages = {"imports": round(self.t0 - self.started, 2)}

    def mark(self, name: str) -> None:
        self.stages[name] = round(time.time() - self.started, 2)


def run(recipe: Recipe, overwrite: bool = False, quiet: bool = False) -> RunResult:
    """Train `recipe` end to end in this process (one of possibly many ranks). The writer rank holds the
    run directory's lock throughout: a second run on the same directory stops at once (runlock.py)."""
    with hold(recipe.output_dir, enabled=process_topology()["rank"] == 0):
        return session(recipe, overwrite, quiet)


def session(recipe: Recipe, overwrite: bool = False, quiet: bool = False) -> RunResult:
    clock = Clock()
    hw = hardware(recipe)
    run_dir, done = prepare_run_dir(recipe, overwrite, hw.rank == 0)
    if done:
        return finished_run(recipe, run_dir, hw)
    libs = training_libraries()
    stop = libs.preemption.StopOnSignal()  # USR1/TERM: finish the step, checkpoint, exit 75 (SLURM requeues)
    prep = data_and_plan(recipe, hw, clock)
    args = training_arguments(recipe, prep, run_dir, libs)
    model, counts, memory = model_with_lora(recipe, prep, hw, run_dir, libs, clock)
    write_run_files(recipe, run_dir, prep, hw, libs, memory)
    trainer = build_trainer(recipe, prep, model, args, run_dir, hw, libs)
    record_launch(trainer, run_dir, hw)
    last, startup = ready_to_train(trainer, prep, run_dir, hw, quiet, libs, memory, stop, clock)
    out = train(trainer, last, stop, run_dir, libs)
    result = measure(recipe, prep, hw, trainer, out, memory, counts, startup, run_dir, clock)
    save(recipe, run_dir, trainer, prep, result)
    return result


# ----------------------------------------------------------------------------------------------- the stages


def hardware(recipe: Recipe):
    """This process's hardware, after pinning one GPU for a lone process on a multi-GPU box (before anything
    initialises CUDA)."""
    if recipe.training.device != "cpu":
        pin_single_process()
    if recipe.training.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError("training.device: gpu, but no CUDA GPU is visible; use device: auto or cpu")
    return detect(force_cpu=recipe.training.device == "cpu")


def finished_run(recipe: Recipe, run_dir: Path, hw) -> RunResult:
    """The result of a run this directory already finished (nothing is trained again)."""
    log.info("%s already holds a finished run of this recipe; not training again (use --overwrite)", run_dir)
    summary = read_json(run_dir / DONE_FILE, {})
    known = {k: v for k, v in summary.items() if k in RunResult.__dataclass_fields__}
    result = RunResult(run_dir, trained=False, **known)
    if recipe.samples.prompts and hw.rank == 0:
        result.samples = compare_samples(recipe, run_dir)
    return result


def training_libraries() -> SimpleNamespace:
    """loraforge's modules that import transformers' Trainer (and with it peft, bitsandbytes, trl) at their top:
    imported here, the one place, after the GPU is pinned and not at all for a run that is already finished."""
    if "peft" not in sys.modules:
        stage("loading the training libraries (transformers' Trainer: peft, bitsandbytes)")
    from loraforge.run import callbacks, memreport, preemption, preference, tracking, trainer

    return SimpleNamespace(callbacks=callbacks, memreport=memreport, preemption=preemption, preference=preference,
                           trainer=trainer, tracking=tracking)


def data_and_plan(recipe: Recipe, hw, clock: Clock) -> Prepared:
    """The data read, validated and tokenized, and the plan; a plan the memory model says cannot fit stops here."""
    stage("reading and tokenizing the data, planning")
    # SFT: conversations; DPO / ORPO: preference pairs (data/pairs.py), the start adapter checked
    prep = prepare(recipe, hw) if recipe.training.method == "sft" else prepare_preference(recipe, hw)
    clock.mark("data_and_plan")
    if prep.plan.fits is False:
        raise UserError(unfit_message(prep.plan.to_dict()))
    return prep


def training_arguments(recipe: Recipe, prep: Prepared, run_dir: Path, libs):
    """The SFTConfig, before the model: it sets this rank's device and (ZeRO-3) switches loading to zero.Init."""
    from transformers import set_seed

    make_args = sft_config if recipe.training.method == "sft" else libs.preference.training_args  # DPOConfig
    args = make_args(recipe, prep.plan, run_dir, libs.tracking.report_to(recipe))
    _ = args.device  # builds accelerate's PartialState now: torch.cuda.set_device(local_rank) on GPUs
    set_seed(recipe.training.seed)  # LoRA's A matrices are random: the same recipe must start from the same weights
    return args


def model_with_lora(recipe: Recipe, prep: Prepared, hw, run_dir: Path, libs, clock: Clock):
    """The base model placed for the strategy, its memory recorded, LoRA on. Returns (model, (trainable, total),
    the memory report)."""
    plan = prep.plan
    stage(f"loading the model {recipe.model.name_or_path}")
    model = load_base_model(
        prep.model_dir, recipe, plan.precision.model_dtype,
        **base_placement(hw.kind, plan.strategy, hw.local_rank, plan.precision.model_dtype, recipe.quantization.mode),
    )
    memory = libs.memreport.DeviceMemoryReport(plan, run_dir, hw.rank)
    memory.after_load(model)
    zero3 = plan.strategy == "zero3"
    if recipe.training.method == "sft":
        model, trainable, total = add_lora(model, recipe.lora, recipe.quantization.mode, plan.gradient_checkpointing,
                                          zero3=zero3)
    else:  # a fresh LoRA, or the SFT run's adapter (model.adapter_from) loaded trainable
        model, trainable, total = libs.preference.add_adapter(model, recipe, plan.gradient_checkpointing, zero3=zero3)
    clock.mark("model")
    if hw.rank == 0:
        log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, (trainable, total), memory


def write_run_files(recipe: Recipe, run_dir: Path, prep: Prepared, hw, libs, memory) -> None:
    """Only now, with data, plan and model all valid, does the run directory get written (rank 0)."""
    if hw.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(redact(dump_recipe(recipe)))
        write_json(run_dir / SOURCE_FILE, {"recipe": str(recipe.source) if recipe.source else None})
        write_json(run_dir / PLAN_FILE, prep.plan.to_dict() | {"hardware": hw.to_dict(), "data": prep.data_summary()})
        write_json(run_dir / VERSIONS_FILE, library_versions())
        libs.tracking.configure(recipe, run_dir)  # trackers' environment; they run on the main process only
    memory.ready = True
    memory.flush()


def build_trainer(recipe: Recipe, prep: Prepared, model, args, run_dir: Path, hw, libs):
    """loraforge's SFTTrainer (run/trainer.py), or its DPO/ORPO trainer (run/preference.py), with the run's
    callbacks; incomplete or damaged checkpoints cleared first."""
    plan, tokenizer = prep.plan, prep.tokenizer
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if hw.rank == 0:
        for leftover in clean_incomplete(ckpt_dir):
            log.info("removed incomplete checkpoint %s", leftover)
        drop_damaged(ckpt_dir)  # verified against the marker's checksums; a damaged one is moved aside
    stage("building the trainer (trl, peft; memory check)")
    cb = libs.callbacks
    callbacks = [
        cb.MetricsFile(run_dir / METRICS_FILE),
        cb.NonFiniteGuard(recipe.training.on_nonfinite, recipe.training.max_skipped_steps, ckpt_dir),
        libs.tracking.TrackedConfig(recipe.tracking.backends, {
            "recipe": recipe.to_dict(), "plan": plan.to_dict(), "hardware": hw.to_dict(), "versions": library_versions(),
        }),
    ]
    if recipe.training.method != "sft":
        return libs.preference.make_trainer(recipe, model, args, tokenizer, prep.train_ds, prep.eval_ds, callbacks)
    attn = getattr(model.config, "_attn_implementation", None) or ""
    return libs.trainer.LoraTrainer(
        model=model,
        args=args,
        data_collator=RowCollator(tokenizer.pad_token_id, plan.max_seq_length, flatten="flash" in attn),
        loss_head=plan.loss_head,
        rows_per_forward=plan.rows_per_forward,
        train_dataset=prep.train_ds,
        eval_dataset=prep.eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def record_launch(trainer, run_dir: Path, hw) -> None:
    """What accelerate really runs, in plan.json (a CPU would turn FSDP into DDP, ACCELERATE_USE_CPU ZeRO into
    DDP, without a word); every rank stops before training if a DeepSpeed launch came up as something else."""
    launched = launch_record(trainer.accelerator, hw)
    if hw.rank == 0:
        update_json(run_dir / PLAN_FILE, {"launch": launched})
    check_launched(launched)


def ready_to_train(trainer, prep: Prepared, run_dir: Path, hw, quiet: bool, libs, memory, stop, clock: Clock):
    """Progress bar and timers on, the checkpoint to resume from, and the memory pre-flight (which shrinks the
    micro-batch on every rank if a real step does not fit). Returns (checkpoint or None, start-up timer)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cb = libs.callbacks
    for default in (PrinterCallback, ProgressCallback):  # replaced by one bar with loss and tokens/s
        trainer.remove_callback(default)
    trainer.add_callback(cb.ProgressBar(enabled=not quiet))
    startup = cb.StartupTimer()
    trainer.add_callback(startup)
    trainer.accelerator.wait_for_everyone()  # the main process has cleaned up before anyone looks
    last = latest_complete(run_dir / CHECKPOINTS_DIR)
    if last and hw.rank == 0:
        log.info("resuming from %s", last)
    prep.plan = preflight(trainer, prep.plan, hw, prep.tokenizer.pad_token_id, run_dir)
    libs.memreport.reset_after_preflight(memory)  # the measured peak is the training steps', not the probe's
    memory.plan = prep.plan
    trainer.add_callback(memory)
    trainer.add_callback(stop)
    clock.mark("trainer")
    return last, startup


def train(trainer, last, stop, run_dir: Path, libs):
    """The training loop (resumed from `last` if there is one); a signal stops it after the step, with a
    checkpoint, and this process exits here (code 75: SLURM requeues)."""
    stage("training" + (f" (resuming from {last.name})" if last else ""))
    out = trainer.train(resume_from_checkpoint=str(last) if last else None)
    libs.preemption.exit_if_preempted(trainer, stop, run_dir)
    return out


def measure(recipe: Recipe, prep: Prepared, hw, trainer, out, memory, counts, startup, run_dir: Path,
            clock: Clock) -> RunResult:
    """Eval loss, peak memory over all ranks, real tokens/s and MFU: the run's summary."""
    stage("training done: evaluating, saving the adapter, writing the model card")
    if startup.startup_s is not None:
        clock.stages["first_step"] = round(startup.startup_s, 2)
    eval_loss = trainer.evaluate().get("eval_loss") if prep.eval_ds is not None else None
    peak, measured = memory.peak_gib()
    tokens = int(getattr(trainer, "_total_train_tokens", 0))
    runtime = out.metrics.get("train_runtime") or 0.0
    tps = tokens / runtime if runtime and tokens else None
    per_token = peak_flops = source = None
    if prep.shape is not None:
        seq = prep.plan.max_seq_length
        per_token = flops.lora_step_flops_per_token(prep.shape, recipe.lora.r, recipe.lora.target_modules,
                                                     [min(n, seq) for n in prep.lengths])
        peak_flops, source = flops.device_peak(hw)
    mfu, source = flops.checked_mfu(tps, per_token, peak_flops, hw.world_size, source) if per_token else (None, source)
    trainable, total = counts
    return RunResult(
        run_dir, trained=True, train_loss=out.training_loss, eval_loss=eval_loss,
        steps=trainer.state.global_step, wall_s=time.time() - clock.t0, trainable_params=trainable, total_params=total,
        tokens_seen=tokens, tokens_per_second=tps, peak_memory_gib=peak, memory_measured=measured,
        predicted_peak_gib=prep.plan.to_dict().get("predicted_peak_gib"), mfu=mfu,
        flops_per_token=per_token, peak_flops=peak_flops, peak_source=source, startup_s=startup.startup_s,
        startup_stages=clock.stages, preference=getattr(trainer, "lf_report", None),
    )


def save(recipe: Recipe, run_dir: Path, trainer, prep: Prepared, result: RunResult) -> None:
    """The adapter (gathered from every rank, checked complete), the sample answers, the tokenizer, checksums,
    the summary that marks the run finished, and the model card."""
    save_adapter(trainer, run_dir)  # every rank: ZeRO-3 / FSDP gather the adapter together; rank 0 writes
    check_saved_adapter(trainer, run_dir)  # all ranks agree: the adapter is complete before the run is "finished"
    samples = final_samples(recipe, run_dir, trainer, prep.tokenizer, prep.plan.strategy)
    if trainer.is_world_process_zero():
        prep.tokenizer.save_pretrained(str(run_dir))
        write_manifest(run_dir)  # checksums of adapter + tokenizer, verified before eval/merge/export/chat
        (run_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml + plan.json say it all
        write_json(run_dir / DONE_FILE, result.summary())
        if samples is not None:
            result.samples = samples
            write_json(run_dir / SAMPLES_FILE, samples)
        write_model_card(run_dir)  # README.md + plots/*.png (replaces peft's empty template)
    trainer.accelerator.wait_for_everyone()
