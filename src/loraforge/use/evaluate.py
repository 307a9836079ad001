"""`loraforge eval`: loss and perplexity on held-out data, base model (adapter off) vs fine-tuned.

The held-out data is, by default, exactly what training held out: the recipe's sources split with the
same `data.eval_split` and seed, plus `data.eval_sources`. It is tokenized by `loraforge.data` with the
same chat template and assistant masks as training, and truncated to the run's `max_seq_length`, so the
tokens that carry the loss are the ones training scored. The loss is the mean negative log-likelihood per
loss-carrying token over the whole set (the trainer's `eval_loss` averages per-batch means instead; the
two agree when the eval set fits one batch); perplexity is exp(loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge.checkpoints import verify_dir
from loraforge.data import dataset as data_mod
from loraforge.data.pairs import chosen_examples
from loraforge.errors import UserError
from loraforge.recipe import DataSource
from loraforge.rundir import EVAL_FILE, PLAN_FILE, read_json, write_json
from loraforge.use.infer import _load_run_recipe, is_run_dir, load_for_inference


@dataclass
class ModelScore:
    loss: float
    perplexity: float


@dataclass
class EvalReport:
    data: str  # what was evaluated, in words
    examples: int
    loss_tokens: int
    base: ModelScore
    fine_tuned: ModelScore

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_examples(recipe, data: str | Path | None) -> tuple[list[dict], str]:
    """(normalised examples, description): `data` if given, else the run's eval split + eval sources."""
    # DPO / ORPO runs: the loss of the chosen answers (data/pairs.py)
    load = data_mod.load_examples if recipe.training.method == "sft" else chosen_examples
    if data is not None:
        path = Path(data).expanduser().resolve()
        return load([DataSource(path=str(path))], recipe), str(path)
    examples = load(recipe.data.sources, recipe)
    _, held = data_mod.split_eval(examples, recipe.data.eval_split, recipe.training.seed)
    parts = [f"{len(held)} held out by data.eval_split={recipe.data.eval_split} (seed {recipe.training.seed})"] if held else []
    if recipe.data.eval_sources:
        extra = load(recipe.data.eval_sources, recipe)
        held = held + extra
        parts.append(f"{len(extra)} from data.eval_sources")
    if not held:
        raise UserError(
            "this run has no held-out data (data.eval_split is 0 and there are no data.eval_sources); "
            "pass --data FILE with held-out examples"
        )
    return held, "the run's eval data: " + ", ".join(parts)


def _max_length(run_dir: Path, recipe) -> int | None:
    plan = run_dir / PLAN_FILE
    if plan.is_file():
        value = read_json(plan, {}).get("max_seq_length")
        if isinstance(value, int):
            return value
    return recipe.data.max_seq_length if isinstance(recipe.data.max_seq_length, int) else None


def nll_sum(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) over tokenized rows with assistant masks."""
    import torch

    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            attention[j, :n] = 1
            labels[j, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])])
        ids, labels, attention = ids.to(device), labels.to(device), attention.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    return total, count


def _score(total: float, count: int) -> ModelScore:
    loss = total / count
    return ModelScore(loss=loss, perplexity=math.exp(loss) if loss < 700 else float("inf"))


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, batch_size: int = 8, model=None, tokenizer=None,
                 write: bool = True) -> EvalReport:
    """Score the held-out data with the base model (adapter disabled) and the fine-tuned one."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: no adapter_config.json; give a run directory written by `loraforge train`")
    if model is None:
        verify_dir(run_dir)  # before reading anything else: a damaged adapter is the first thing to hear about
    recipe = _load_run_recipe(run_dir)
    examples, description = held_out_examples(recipe, data)
    if model is None:
        model, tokenizer = load_for_inference(run_dir)
    model.eval()
    ds = data_mod.tokenize_all(examples, tokenizer, None, recipe.data.loss_on)
    limit = _max_length(run_dir, recipe)
    rows = [
        {"input_ids": ids[:limit] if limit else ids, "assistant_masks": mask[:limit] if limit else mask}
        for ids, mask in zip(ds["input_ids"], ds["assistant_masks"])
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with model.disable_adapter():
        base_total, count = nll_sum(model, rows, pad_id, batch_size)
    tuned_total, count = nll_sum(model, rows, pad_id, batch_size)
    if count == 0:
        raise UserError(f"{description}: no token carries loss (after truncation to {limit}); nothing to evaluate")
    report = EvalReport(description, len(rows), count, _score(base_total, count), _score(tuned_total, count))
    if write:
        try:
            write_json(run_dir / EVAL_FILE, report.to_dict())
        except OSError:
            pass  # a read-only run directory still gets its numbers printed
    return report
