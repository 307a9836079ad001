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

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("run_dir", "trained", "samples")}
        out["wall_s"] = round(self.wall_s, 1)
        return out


def make_plan(recipe: Recipe, hw, longest_sample: int, model_max: int | None, shape=None, lengths=None):
    """The plan. With the model's shape (memory.ModelShape) the memory model chooses micro-batch, accumulation,
    sequence length and checkpointing for `hw`'s budget; without it, a split of the global batch only."""
    from .planner import Plan, choose_precision, choose_seq_length, plan_batch

    t = recipe.training
    precision = choose_precision(hw.kind == "cuda", hw.bf16, recipe.model.dtype)
    if shape is not None:
        from dataclasses import replace

        from .launch import check_supported, strategy_from_env
        from .planner import plan_with_memory

        strategy = (getattr(hw, "strategy", None) or strategy_from_env()) if hw.world_size > 1 else "single"
        strategy = "ddp" if strategy == "single" and hw.world_size > 1 else strategy
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
    from .launch import check_supported, strategy_from_env

    strategy = strategy_from_env() if hw.world_size > 1 else "single"
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
    examples = data_mod.load_examples(recipe.data.sources, recipe)
    train_ex, eval_ex = data_mod.split_eval(examples, recipe.data.eval_split, recipe.training.seed)
    if recipe.data.eval_sources:
        eval_ex = eval_ex + data_mod.load_examples(recipe.data.eval_sources, recipe)

    model_dir = base_model_dir(recipe)
    tokenizer = load_tokenizer(model_dir, recipe, template)
    from . import tokencache

    key = tokencache.cache_key(train_ex, eval_ex, tokenizer, recipe.data.loss_on)
    cached = tokencache.load(key)
    if cached is not None:
        train_ds, eval_ds, lengths = cached
        log.info("tokenized data from the cache (%s)", key)
    else:
        train_ds = data_mod.tokenize_all(train_ex, tokenizer, None, recipe.data.loss_on)
        eval_ds = data_mod.tokenize_all(eval_ex, tokenizer, None, recipe.data.loss_on) if eval_ex else None
        lengths = [len(x) for x in train_ds["input_ids"]]
        if hw.rank == 0:  # one writer; the others tokenize too (the same result) rather than wait
            tokencache.save(key, train_ds, eval_ds, lengths)

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
    run_dir = Path(recipe.output_dir).expanduser()
    existing = run_dir / "recipe.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            if is_main:
                shutil.rmtree(run_dir)
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


def sft_config(recipe: Recipe, plan, run_dir: Path, quiet: bool):
    from trl import SFTConfig

    t = recipe.training
    from .tracking import configure

    report = configure(recipe, run_dir)
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
        use_cpu=plan.precision.use_cpu,
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
    """Train `recipe` end to end in this process (one of possibly many ranks)."""
    from .callbacks import process_start_time
    from .hardware import detect

    t0 = time.time()
    started = process_start_time()
    stages = {"imports": round(t0 - started, 2)}
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

    from .preemption import StopOnSignal, exit_if_preempted

    stop = StopOnSignal()  # USR1/TERM: finish the step, checkpoint, exit 75 (SLURM requeues; see preemption.py)
    prep = prepare(recipe, hw)
    stages["data_and_plan"] = round(time.time() - started, 2)
    plan, tokenizer = prep.plan, prep.tokenizer
    if plan.fits is False:  # the memory model says it cannot fit: do not launch
        from .planner import unfit_message

        raise UserError(unfit_message(plan.to_dict()))
    from .modeling import add_lora, base_placement, load_base_model

    from transformers import set_seed

    set_seed(recipe.training.seed)  # LoRA's A matrices are random: the same recipe must start from the same weights
    model = load_base_model(
        prep.model_dir, recipe, plan.precision.model_dtype,
        **base_placement(hw.kind, plan.strategy, hw.local_rank, plan.precision.model_dtype),
    )
    model, trainable, total = add_lora(model, recipe, plan.gradient_checkpointing)
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

    from .callbacks import MetricsFile, NonFiniteGuard
    from .tracking import TrackedConfig
    from .checkpoints import clean_incomplete, latest_complete
    from .trainer import make_trainer_class

    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        for leftover in clean_incomplete(ckpt_dir):
            log.info("removed incomplete checkpoint %s", leftover)
    from .batching import RowCollator

    attn = getattr(model.config, "_attn_implementation", None) or ""
    trainer = make_trainer_class()(
        model=model,
        args=sft_config(recipe, plan, run_dir, quiet),
        data_collator=RowCollator(tokenizer.pad_token_id, plan.max_seq_length, flatten="flash" in attn),
        loss_head=plan.loss_head,
        rows_per_forward=plan.rows_per_forward,
        train_dataset=prep.train_ds,
        eval_dataset=prep.eval_ds,
        processing_class=tokenizer,
        callbacks=[
            MetricsFile(run_dir / "metrics.jsonl"),
            NonFiniteGuard(recipe.training.on_nonfinite, recipe.training.max_skipped_steps, ckpt_dir),
            TrackedConfig(recipe.tracking.backends, {
                "recipe": recipe.to_dict(), "plan": plan.to_dict(), "hardware": hw.to_dict(),
                "versions": library_versions(),
            }),
        ],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callbacks import ProgressBar

    for default in (PrinterCallback, ProgressCallback):  # replaced by one bar with loss and tokens/s
        trainer.remove_callback(default)
    trainer.add_callback(ProgressBar(enabled=not quiet))
    from .callbacks import StartupTimer

    startup = StartupTimer()
    trainer.add_callback(startup)
    from .launch import check_launched, launch_record

    launched = launch_record(trainer.accelerator, hw)  # what really ran: distributed type, ZeRO stage, world
    if is_main:
        _write_json(run_dir / "launch.json", launched)
    check_launched(launched)
    trainer.accelerator.wait_for_everyone()  # the main process has cleaned up before anyone looks
    last = latest_complete(ckpt_dir)
    if last and is_main:
        log.info("resuming from %s", last)
    from .memguard import measured_peak_callback, preflight

    plan = preflight(trainer, plan, hw, tokenizer.pad_token_id, run_dir)  # shrinks micro-batch on OOM, all ranks
    trainer.add_callback(measured_peak_callback(plan, run_dir))
    trainer.add_callback(stop)
    stages["trainer"] = round(time.time() - started, 2)
    out = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if startup.startup_s is not None:
        stages["first_step"] = round(startup.startup_s, 2)
    exit_if_preempted(trainer, stop, run_dir)  # stopped on a signal: checkpoint written, exits here
    eval_loss = None
    if prep.eval_ds is not None:
        eval_loss = trainer.evaluate().get("eval_loss")

    from .trainer import peak_memory_gib

    peak, measured = peak_memory_gib()
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
    result = RunResult(
        run_dir, trained=True, train_loss=out.training_loss, eval_loss=eval_loss,
        steps=trainer.state.global_step, wall_s=time.time() - t0, trainable_params=trainable, total_params=total,
        tokens_seen=tokens, tokens_per_second=tps, peak_memory_gib=peak, memory_measured=measured,
        predicted_peak_gib=plan.to_dict().get("predicted_peak_gib"),
        mfu=flops.mfu(tps, per_token, peak_flops, hw.world_size) if per_token else None,
        flops_per_token=per_token, peak_flops=peak_flops, peak_source=source, startup_s=startup.startup_s,
        startup_stages=stages,
    )
    trainer.save_model(str(run_dir))  # every rank: ZeRO-3 / FSDP gather the adapter together; rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir))
        (run_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml + plan.json say it all
        _write_json(run_dir / DONE_FILE, result.summary())
        if recipe.samples.prompts:
            # One process: the model in memory. Several: a fresh copy (sharded weights cannot generate on one rank).
            in_memory = trainer.model if hw.world_size == 1 else None
            result.samples = compare_samples(recipe, run_dir, tokenizer, model=in_memory)
        from .card import write_model_card

        write_model_card(run_dir)  # README.md + plots/*.png (replaces peft's empty template)
    trainer.accelerator.wait_for_everyone()
    return result


def compare_samples(recipe: Recipe, run_dir: Path, tokenizer=None, model=None) -> list[dict]:
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
