"""recipe + hardware -> tokenized training rows and the plan: everything decided before the model loads.

Data is read first: a bad record stops the run before any model is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraforge.data import dataset as data_mod
from loraforge.errors import UserError
from loraforge.model.modeling import base_model_dir, load_tokenizer
from loraforge.plan.memory import model_shape
from loraforge.plan.planner import make_plan, truncation_report
from loraforge.recipe import Recipe

log = logging.getLogger("loraforge")


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
    extra_summary: dict | None = None  # what a preference run adds to plan.json's "data" (data/pairs.py)

    def data_summary(self) -> dict:
        return (self.extra_summary or {}) | {
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
    template = data_mod.resolve_chat_template(recipe)
    # Streamed (data.py): read + validated first (a bad record stops here, before any model loads), then
    # tokenized into memory-mapped files on disk, cached between runs: bounded memory whatever the data's
    # size. One cache writer; the other ranks tokenize too (the same result) rather than wait.
    scan = data_mod.scan_data(recipe)
    model_dir = base_model_dir(recipe)
    tokenizer = load_tokenizer(model_dir, recipe, template)
    warn_if_system_prompt_dropped(recipe, tokenizer, template)
    train_ds, eval_ds, lengths = data_mod.tokenized_data(recipe, tokenizer, scan, write_cache=hw.rank == 0)

    plan, shape = plan_for_lengths(recipe, hw, model_dir, lengths)
    truncated = truncation_report(lengths, plan.max_seq_length)
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


def warn_if_system_prompt_dropped(recipe: Recipe, tokenizer, template) -> None:
    """data.system_prompt that the model's chat template does not render in training conversations has no effect:
    say so (one warning) rather than train without it silently."""
    prompt = recipe.data.system_prompt
    if prompt and data_mod.system_prompt_dropped(tokenizer, template, prompt):
        log.warning("data.system_prompt: this model's chat template leaves it out of conversations that end with an "
                    "answer (as Mistral v0.3's does), so it has no effect on training; set data.chat_template to a "
                    "template that renders system turns, or put the instruction in the user turns")


def plan_for_lengths(recipe: Recipe, hw, model_dir: str, lengths: list[int]):
    """The plan for samples of these token lengths on `hw`, from the model's config; (plan, model shape). A
    sequence length beyond the model's context stops here."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code,
                                        revision=recipe.model.revision)
    model_max = getattr(config, "max_position_embeddings", None)
    shape = model_shape(config.to_dict())
    plan = make_plan(recipe, hw, max(lengths), model_max, shape=shape, lengths=lengths)
    if model_max and plan.max_seq_length > model_max:
        raise UserError(f"data.max_seq_length: {plan.max_seq_length} is beyond the model's context of {model_max} "
                        f"tokens; set it to {model_max} or less (or auto)")
    return plan, shape
