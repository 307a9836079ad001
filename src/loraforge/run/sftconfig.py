"""The plan as trl's SFTConfig (and the device/backend choice inside it): a pure mapping."""

from __future__ import annotations

from pathlib import Path

from loraforge.recipe import Recipe
from loraforge.rundir import CHECKPOINTS_DIR


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


def training_arguments(recipe: Recipe, plan, run_dir: Path, report_to) -> dict:
    """The arguments every loraforge trainer gets from the plan (SFT's SFTConfig and DPO/ORPO's DPOConfig alike):
    the batch split, schedule, precision, device, checkpointing, logging and saving."""
    t = recipe.training
    has_eval = recipe.data.eval_split > 0 or bool(recipe.data.eval_sources)
    return dict(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
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
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if t.eval_steps else "no") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=report_to,
        run_name=recipe.tracking.run_name or run_dir.name,
        disable_tqdm=True,  # our ProgressBar callback instead
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def sft_config(recipe: Recipe, plan, run_dir: Path, report_to):
    """The SFTConfig for this plan. Built before the model loads: creating it sets each rank's device and,
    under `accelerate launch` with DeepSpeed ZeRO-3, registers the DeepSpeed config so that `from_pretrained`
    partitions the weights while loading (zero.Init) instead of every rank holding the whole model."""
    from trl import SFTConfig

    return SFTConfig(
        **training_arguments(recipe, plan, run_dir, report_to),
        packing=False,  # done in prepare() (data.training_rows); batching.RowCollator builds the rows
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, labelled and truncated by loraforge
    )
