"""The one training entry point every launcher runs: `python -m loraforge.train RECIPE [--set k=v ...]`.

recipe -> hardware -> plan -> model + data -> SFTTrainer -> run directory. Under `accelerate launch`,
`torchrun` or `srun` each process runs this same file and computes the same plan from the same inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .recipe import Recipe, dump_recipe, load_recipe
from .secrets import redact

log = logging.getLogger("loraforge")

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "pydantic", "gguf")
DONE_FILE = "train_summary.json"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "loraforge": __import__("loraforge").__version__}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


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
    preference: dict | None = None  # training.method dpo/orpo: before/after scores (preference.py)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("run_dir", "trained", "samples")}
        out["wall_s"] = round(self.wall_s, 1)
        return out


def launched_strategy(hw) -> str:
    """The strategy this process was launched under: "single" for one process, else what the launcher's
    environment says (hardware.detect read it into `hw.strategy`), "ddp" when it says nothing."""
    if hw.world_size <= 1:
        return "single"
    from .launch import strategy_from_env

    strategy = getattr(hw, "strategy", None) or strategy_from_env()
    return "ddp" if strategy == "single" else strategy


def make_plan(recipe: Recipe, hw, longest_sample: int, model_max: int | None, shape=None, lengths=None):
    """The plan. With the model's shape (memory.ModelShape) the memory model chooses micro-batch, accumulation,
    sequence length and checkpointing for `hw`'s budget; without it, a split of the global batch only."""
    from .planner import choose_precision

    precision = choose_precision(hw.kind == "cuda", hw.bf16, recipe.model.dtype)
    plan = _make_plan(recipe, hw, precision, longest_sample, model_max, shape, lengths)
    from dataclasses import replace

    from .gpu_pin import pin_note

    note = pin_note()
    if note is None and hw.world_size == 1 and len(getattr(hw, "gpus", ()) or ()) > 1:
        note = (f"one process with {len(hw.gpus)} GPUs visible: training uses one GPU (loraforge pins GPU 0 before "
                "CUDA starts); use `loraforge launch` to train on all of them")
    return replace(plan, notes=plan.notes + (note,)) if note else plan


def _make_plan(recipe: Recipe, hw, precision, longest_sample: int, model_max: int | None, shape, lengths):
    from .planner import Plan, choose_seq_length, plan_batch

    t = recipe.training
    if shape is not None:
        from dataclasses import replace

        from .launch import check_supported
        from .planner import plan_with_memory

        strategy = launched_strategy(hw)
        check_supported(strategy, recipe.quantization.mode)
        plan = plan_with_memory(recipe, hw, precision, strategy, shape, longest_sample, model_max, lengths)
        if strategy == "fsdp" and hw.kind == "cpu":
            plan = replace(plan, notes=plan.notes + ("on CPU, accelerate runs FSDP as plain DDP: the weights are not sharded here (a GPU run is)",))
        return plan
    batch = plan_batch(
        t.global_batch_size,
        hw.world_size,
        None if t.micro_batch_size == "auto" else t.micro_batch_size,
        None if t.gradient_accumulation_steps == "auto" else t.gradient_accumulation_steps,
    )
    seq, notes = choose_seq_length(recipe.data.max_seq_length, longest_sample, model_max)
    if t.gradient_checkpointing == "auto":
        # Until the memory model decides (hardware profiles), checkpoint quantized runs only.
        gc = recipe.quantization.mode != "none"
        notes.append(f"gradient checkpointing auto -> {'on' if gc else 'off'}")
    else:
        gc = bool(t.gradient_checkpointing)
    from .launch import check_supported

    strategy = launched_strategy(hw)
    check_supported(strategy, recipe.quantization.mode != "none")
    if strategy == "fsdp" and hw.kind == "cpu":
        notes.append("on CPU, accelerate runs FSDP as plain DDP: the weights are not sharded here (a GPU run is)")
    from .planner import execution

    batch, rows, head, run_notes = execution(batch, t, precision.use_cpu)
    return Plan(batch=batch, precision=precision, max_seq_length=seq, gradient_checkpointing=gc, strategy=strategy,
                notes=tuple(notes) + run_notes, rows_per_forward=rows, loss_head=head)



@dataclass
class Prepared:
    """Everything decided before the model loads: data tokenized, plan made."""

    plan: object
    tokenizer: object
    train_ds: object
    eval_ds: object
    model_dir: str
    lengths: list[int]
    truncated: tuple[int, float]
    shape: object = None  # memory.ModelShape, None for an architecture the memory model does not know

    def data_summary(self) -> dict:
        return {
            "train_examples": len(self.lengths),
            "eval_examples": len(self.eval_ds) if self.eval_ds is not None else 0,
            "longest_sample_tokens": max(self.lengths),
            "train_tokens": sum(self.lengths),
            "truncated_examples": self.truncated[0],
            "truncated_token_share": round(self.truncated[1], 6),
        }


def prepare(recipe: Recipe, hw) -> Prepared:
    """recipe + hardware -> tokenized data and the plan. Data is read first: a bad record stops the run
    before any model is loaded."""
    from transformers import AutoConfig

    from . import data as data_mod
    from .modeling import base_model_dir, load_tokenizer

    template = data_mod.resolve_chat_template(recipe)
    # Streamed (data.py): read + validated first (a bad record stops here, before any model loads), then
    # tokenized into memory-mapped files on disk, cached between runs: bounded memory whatever the data's
    # size. One cache writer; the other ranks tokenize too (the same result) rather than wait.
    scan = data_mod.scan_data(recipe)
    model_dir = base_model_dir(recipe)
    tokenizer = load_tokenizer(model_dir, recipe, template)
    train_ds, eval_ds, lengths = data_mod.tokenized_data(recipe, tokenizer, scan, write_cache=hw.rank == 0)

    config = AutoConfig.from_pretrained(
        model_dir, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
    )
    model_max = getattr(config, "max_position_embeddings", None)
    from .memory import model_shape

    shape = model_shape(config.to_dict())
    plan = make_plan(recipe, hw, max(lengths), model_max, shape=shape, lengths=lengths)
    if model_max and plan.max_seq_length > model_max:
        raise UserError(
            f"data.max_seq_length: {plan.max_seq_length} is beyond the model's context of {model_max} tokens; "
            f"set it to {model_max} or less (or auto)"
        )
    truncated = data_mod.truncation_report(lengths, plan.max_seq_length)
    if truncated[0]:
        log.warning(
            "%d of %d samples are longer than max_seq_length %d; truncation cuts %.1f%% of the tokens",
            truncated[0], len(lengths), plan.max_seq_length, 100 * truncated[1],
        )
    seed = recipe.training.seed
    train_rows, dropped = data_mod.training_rows(train_ds, plan.max_seq_length, recipe.data.packing, seed)
    if dropped:
        log.warning("%d training samples carry no loss token within max_seq_length %d and are left out",
                    dropped, plan.max_seq_length)
    if not len(train_rows):
        raise UserError(f"data.sources: no sample has a loss token within max_seq_length {plan.max_seq_length}; "
                        "raise data.max_seq_length or check data.loss_on")
    eval_rows = data_mod.training_rows(eval_ds, plan.max_seq_length)[0] if eval_ds is not None else None
    if eval_rows is not None and not len(eval_rows):
        eval_rows = None
    return Prepared(plan, tokenizer, train_rows, eval_rows, model_dir, lengths, truncated, shape)


def prepare_run_dir(recipe: Recipe, overwrite: bool, is_main: bool) -> tuple[Path, bool]:
    """Create the run directory; (path, already complete). A different recipe in a used directory stops."""
    from .runlock import LOCK_FILE

    run_dir = Path(recipe.output_dir).expanduser()
    existing = run_dir / "recipe.yaml"
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if overwrite:
            if is_main:
                for p in run_dir.iterdir():  # all but the run lock this process holds
                    if p.name != LOCK_FILE:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif existing.is_file():
            import yaml

            if yaml.safe_load(existing.read_text()) != recipe.to_dict():
                raise UserError(
                    f"{run_dir}: holds a run of a different recipe; use --overwrite to replace it, "
                    "or set output_dir to a new directory"
                )
        else:
            raise UserError(f"{run_dir}: exists and is not a loraforge run; use --overwrite or a new output_dir")
    done = (run_dir / DONE_FILE).is_file() and not overwrite
    return run_dir, done


def _write_json(path: Path, obj) -> None:
    """Atomically, and with any secret value masked."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(redact(json.dumps(obj, indent=2, default=str)) + "\n")
    os.replace(tmp, path)


def device_kwargs(cpu: bool, strategy: str) -> dict:
    """The training arguments that choose the device and backend (a pure decision).

    DeepSpeed runs on the CPU too, but accelerate engages it only when not told `cpu` (state.py): on a CPU
    machine ZeRO ranks keep use_cpu off (they land on the CPU device anyway) and name gloo: with no GPU,
    accelerate finds no default backend, and a DeepSpeed state would count one process ("No backend == no
    distributed training") while DeepSpeed itself sees them all."""
    return {
        "use_cpu": cpu and not strategy.startswith("zero"),
        "ddp_backend": "gloo" if cpu and strategy != "single" else None,
    }


def sft_config(recipe: Recipe, plan, run_dir: Path, report_to):
    """The SFTConfig for this plan. Built before the model loads: creating it sets each rank's device and,
    under `accelerate launch` with DeepSpeed ZeRO-3, registers the DeepSpeed config so that `from_pretrained`
    partitions the weights while loading (zero.Init) instead of every rank holding the whole model."""
    from trl import SFTConfig

    t = recipe.training
    report = report_to
    has_eval = recipe.data.eval_split > 0 or bool(recipe.data.eval_sources)
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=plan.batch.micro_batch_size,
        per_device_eval_batch_size=plan.batch.micro_batch_size,
        gradient_accumulation_steps=plan.batch.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=plan.precision.bf16,
        fp16=plan.precision.fp16,
        **device_kwargs(plan.precision.use_cpu, plan.strategy),
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        max_length=plan.max_seq_length,
        packing=False,  # done in prepare() (data.training_rows); batching.RowCollator builds the rows
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, labelled and truncated by loraforge
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=report,
        run_name=recipe.tracking.run_name or run_dir.name,
        disable_tqdm=True,  # our ProgressBar callback instead
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def run(recipe: Recipe, overwrite: bool = False, quiet: bool = False) -> RunResult:
    """Train `recipe` end to end in this process (one of possibly many ranks). The writer rank holds the
    run directory's lock throughout: a second run on the same directory stops at once (runlock.py)."""
    from .hardware import process_topology
    from .runlock import hold

    with hold(recipe.output_dir, enabled=process_topology()["rank"] == 0):
        return _run(recipe, overwrite, quiet)


def _run(recipe: Recipe, overwrite: bool = False, quiet: bool = False) -> RunResult:
    from .hardware import detect
    from .status import process_start_time, stage  # not .callbacks: it imports transformers' Trainer (peft, ...)

    t0 = time.time()
    started = process_start_time()
    stages = {"imports": round(t0 - started, 2)}
    if recipe.training.device != "cpu":
        from .gpu_pin import pin_single_process

        pin_single_process()  # one process on a multi-GPU box: one GPU, before anything initialises CUDA
    if recipe.training.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError("training.device: gpu, but no CUDA GPU is visible; use device: auto or cpu")
    hw = detect(force_cpu=recipe.training.device == "cpu")
    is_main = hw.rank == 0
    run_dir, done = prepare_run_dir(recipe, overwrite, is_main)

    if done:
        log.info("%s already holds a finished run of this recipe; not training again (use --overwrite)", run_dir)
        summary = json.loads((run_dir / DONE_FILE).read_text())
        known = {k: v for k, v in summary.items() if k in RunResult.__dataclass_fields__}
        result = RunResult(run_dir, trained=False, **known)
        if recipe.samples.prompts and is_main:
            result.samples = compare_samples(recipe, run_dir)
        return result

    if "peft" not in sys.modules:
        stage("loading the training libraries (transformers' Trainer: peft, bitsandbytes)")
    from .preemption import StopOnSignal, exit_if_preempted

    stop = StopOnSignal()  # USR1/TERM: finish the step, checkpoint, exit 75 (SLURM requeues; see preemption.py)
    stage("reading and tokenizing the data, planning")
    pref = None
    if recipe.training.method != "sft":  # DPO / ORPO: pairs, DPOConfig, starting adapter, trainer (preference.py)
        from . import preference as pref
        from .pref_data import prepare_preference
    prep = prepare_preference(recipe, hw) if pref else prepare(recipe, hw)
    stages["data_and_plan"] = round(time.time() - started, 2)
    plan, tokenizer = prep.plan, prep.tokenizer
    if plan.fits is False:  # the memory model says it cannot fit: do not launch
        from .planner import unfit_message

        raise UserError(unfit_message(plan.to_dict()))
    from .modeling import add_lora, base_placement, load_base_model
    from .tracking import report_to

    from transformers import set_seed

    # The training arguments first: they set this rank's device and (ZeRO-3) switch loading to zero.Init.
    args = (pref.training_args if pref else sft_config)(recipe, plan, run_dir, report_to(recipe))
    _ = args.device  # builds accelerate's PartialState now: torch.cuda.set_device(local_rank) on GPUs
    set_seed(recipe.training.seed)  # LoRA's A matrices are random: the same recipe must start from the same weights
    stage(f"loading the model {recipe.model.name_or_path}")
    model = load_base_model(
        prep.model_dir, recipe, plan.precision.model_dtype,
        **base_placement(hw.kind, plan.strategy, hw.local_rank, plan.precision.model_dtype, recipe.quantization.mode),
    )
    from .memreport import DeviceMemoryReport

    memory_report = DeviceMemoryReport(plan, run_dir, hw.rank)
    memory_report.after_load(model)
    model, trainable, total = (pref.add_adapter if pref else add_lora)(model, recipe, plan.gradient_checkpointing,
                                                                        zero3=plan.strategy == "zero3")
    stages["model"] = round(time.time() - started, 2)
    if is_main:
        log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # Only now, with data, plan and model all valid, does the run directory get written.
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(redact(dump_recipe(recipe)))
        _write_json(run_dir / "source.json", {"recipe": str(recipe.source) if recipe.source else None})
        _write_json(run_dir / "plan.json", plan.to_dict() | {"hardware": hw.to_dict(), "data": prep.data_summary()})
        _write_json(run_dir / "versions.json", library_versions())
        from .tracking import configure

        configure(recipe, run_dir)  # trackers' environment; they run on the main process only
    memory_report.ready = True
    memory_report.flush()

    from .callbacks import MetricsFile, NonFiniteGuard
    from .tracking import TrackedConfig
    from .checkpoints import clean_incomplete, drop_damaged, latest_complete
    from .trainer import make_trainer_class

    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        for leftover in clean_incomplete(ckpt_dir):
            log.info("removed incomplete checkpoint %s", leftover)
        drop_damaged(ckpt_dir)  # verified against the marker's checksums; a damaged one is moved aside
    stage("building the trainer (trl, peft; memory check)")
    from .batching import RowCollator

    attn = getattr(model.config, "_attn_implementation", None) or ""
    callbacks = [
        MetricsFile(run_dir / "metrics.jsonl"),
        NonFiniteGuard(recipe.training.on_nonfinite, recipe.training.max_skipped_steps, ckpt_dir),
        TrackedConfig(recipe.tracking.backends, {
            "recipe": recipe.to_dict(), "plan": plan.to_dict(), "hardware": hw.to_dict(),
            "versions": library_versions(),
        }),
    ]
    if pref:
        trainer = pref.make_trainer(recipe, model, args, tokenizer, prep.train_ds, prep.eval_ds, callbacks)
    else:
        trainer = make_trainer_class()(
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
    from .launch import check_launched, launch_record

    # What accelerate really runs (a CPU would turn FSDP into DDP, ACCELERATE_USE_CPU ZeRO into DDP, without a
    # word): in plan.json (`distributed_type`, `accelerate_config`, and `launch`: ZeRO stage, offload, world, nodes)
    launched = launch_record(trainer.accelerator, hw)
    if is_main:
        path = run_dir / "plan.json"
        _write_json(path, json.loads(path.read_text()) | {
            "distributed_type": launched["distributed_type"], "accelerate_config": launched["accelerate_config"],
            "launch": launched,
        })
    check_launched(launched)  # every rank: stop before training if a DeepSpeed launch came up as something else
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callbacks import ProgressBar

    for default in (PrinterCallback, ProgressCallback):  # replaced by one bar with loss and tokens/s
        trainer.remove_callback(default)
    trainer.add_callback(ProgressBar(enabled=not quiet))
    from .callbacks import StartupTimer

    startup = StartupTimer()
    trainer.add_callback(startup)
    trainer.accelerator.wait_for_everyone()  # the main process has cleaned up before anyone looks
    last = latest_complete(ckpt_dir)
    if last and is_main:
        log.info("resuming from %s", last)
    from .memguard import preflight
    from .memreport import reset_after_preflight

    plan = preflight(trainer, plan, hw, tokenizer.pad_token_id, run_dir)  # shrinks micro-batch on OOM, all ranks
    reset_after_preflight(memory_report)  # the measured peak is the training steps', not the probe's
    memory_report.plan = plan
    trainer.add_callback(memory_report)
    trainer.add_callback(stop)
    stages["trainer"] = round(time.time() - started, 2)
    stage("training" + (f" (resuming from {last.name})" if last else ""))
    out = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if startup.startup_s is not None:
        stages["first_step"] = round(startup.startup_s, 2)
    exit_if_preempted(trainer, stop, run_dir)  # stopped on a signal: checkpoint written, exits here
    stage("training done: evaluating, saving the adapter, writing the model card")
    eval_loss = None
    if prep.eval_ds is not None:
        eval_loss = trainer.evaluate().get("eval_loss")

    peak, measured = memory_report.peak_gib()  # the largest over all ranks
    tokens = int(getattr(trainer, "_total_train_tokens", 0))
    runtime = out.metrics.get("train_runtime") or 0.0
    tps = tokens / runtime if runtime and tokens else None
    from . import flops

    per_token = peak_flops = source = None
    if prep.shape is not None:
        seq = plan.max_seq_length
        per_token = flops.lora_step_flops_per_token(prep.shape, recipe.lora.r, recipe.lora.target_modules,
                                                     [min(n, seq) for n in prep.lengths])
        peak_flops, source = flops.device_peak(hw)
    mfu, source = flops.checked_mfu(tps, per_token, peak_flops, hw.world_size, source) if per_token else (None, source)
    result = RunResult(
        run_dir, trained=True, train_loss=out.training_loss, eval_loss=eval_loss,
        steps=trainer.state.global_step, wall_s=time.time() - t0, trainable_params=trainable, total_params=total,
        tokens_seen=tokens, tokens_per_second=tps, peak_memory_gib=peak, memory_measured=measured,
        predicted_peak_gib=plan.to_dict().get("predicted_peak_gib"),
        mfu=mfu,
        flops_per_token=per_token, peak_flops=peak_flops, peak_source=source, startup_s=startup.startup_s,
        startup_stages=stages, preference=getattr(trainer, "lf_report", None),
    )
    from .saving import check_saved_adapter, save_adapter

    save_adapter(trainer, run_dir)  # every rank: ZeRO-3 / FSDP gather the adapter together; rank 0 writes
    check_saved_adapter(trainer, run_dir)  # all ranks agree: the adapter is complete before the run is "finished"
    samples = final_samples(recipe, run_dir, trainer, tokenizer, plan.strategy)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))
        from .checkpoints import write_manifest

        write_manifest(run_dir)  # checksums of adapter + tokenizer, verified before eval/merge/export/chat
        (run_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml + plan.json say it all
        _write_json(run_dir / DONE_FILE, result.summary())
        if samples is not None:
            result.samples = samples
            _write_json(run_dir / "samples.json", samples)
        from .card import write_model_card

        write_model_card(run_dir)  # README.md + plots/*.png (replaces peft's empty template)
    trainer.accelerator.wait_for_everyone()
    return result


def final_samples(recipe: Recipe, run_dir: Path, trainer, tokenizer, strategy: str) -> list[dict] | None:
    """The sample answers after training, from the model in memory (never a second copy of the base on one
    GPU). Replicated strategies (single, DDP, ZeRO-2): rank 0 answers alone. Sharded ones (FSDP, ZeRO-3):
    every rank runs the same generation in lockstep, since each forward gathers the shards collectively.
    Returns the rows on rank 0, None elsewhere or without prompts."""
    if not recipe.samples.prompts:
        return None
    sharded = strategy in ("fsdp", "zero3") and trainer.args.world_size > 1
    if not sharded and not trainer.is_world_process_zero():
        return None
    model = trainer.model if sharded else trainer.accelerator.unwrap_model(trainer.model)
    rows = compare_samples(recipe, run_dir, tokenizer, model=model, write=False)
    return rows if trainer.is_world_process_zero() else None


def compare_samples(recipe: Recipe, run_dir: Path, tokenizer=None, model=None, write: bool = True) -> list[dict]:
    """Answer the recipe's sample prompts with the base model (adapter off) and the fine-tuned one."""
    from .infer import answer, load_for_inference

    if model is None:
        model, tokenizer = load_for_inference(run_dir)
    model.eval()
    n = recipe.samples.max_new_tokens
    rows = []
    for prompt in recipe.samples.prompts:
        with model.disable_adapter():
            base = answer(model, tokenizer, prompt, n, recipe.data.system_prompt)
        tuned = answer(model, tokenizer, prompt, n, recipe.data.system_prompt)
        rows.append({"prompt": prompt, "base": base, "fine_tuned": tuned})
    if write:
        _write_json(run_dir / "samples.json", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from .cli import quiet_libraries, run_guarded

    quiet_libraries()
    from .resources import find_recipe

    def _go():
        recipe = load_recipe(find_recipe(args.recipe), args.overrides)
        run(recipe, overwrite=args.overwrite, quiet=args.quiet)

    code = run_guarded(_go)
    if code == 0:
        from .preemption import teardown

        teardown()  # barrier + destroy_process_group: no gloo abort at exit
    return code


if __name__ == "__main__":
    sys.exit(main())
