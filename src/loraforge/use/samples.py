"""The sample answers: the recipe's prompts answered by the base model (adapter off) and the fine-tuned one."""

from __future__ import annotations

from pathlib import Path

from loraforge.recipe import Recipe
from loraforge.rundir import SAMPLES_FILE, write_json
from loraforge.use.infer import answer, load_for_inference


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
        write_json(run_dir / SAMPLES_FILE, rows)
    return rows
