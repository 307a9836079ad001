"""Preference data: pairs of answers to one prompt, the preferred one (`chosen`) and the other (`rejected`).

Formats, detected per record (a record with `chosen` and `rejected` is a preference record):
- `{"prompt": str, "chosen": str, "rejected": str}` (optional `"system"`): a user turn and two assistant answers.
- `{"prompt": [turns], "chosen": [turns], "rejected": [turns]}`: trl's conversational form (explicit prompt).
- `{"chosen": [whole conversation], "rejected": [whole conversation]}`: UltraFeedback style; the shared turns at
  the start are the prompt, the rest the answers (a `prompt` string beside them is then ignored).
- `{"conversations": [sharegpt turns], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}`: LLaMA-Factory's.
Answers may also be one message object (`{"role": "assistant", "content": ...}`).

Each pair is rendered through the chat template (the recipe's, or the model's): the prompt with the generation
prompt (`<|im_start|>assistant\n`), each answer as what the template adds after it, tokenized on its own as
generation would produce it. Records are read with data.py's reader (JSON lines streamed, JSON, Parquet, CSV, hub);
a bad record stops the run before any model loads, naming its file and line.

Truncation, when prompt + answer exceed max_seq_length L (reported in plan.json `preference_data`): the prompt
keeps its last `preference.max_prompt_length` tokens (auto: L // 2) — the question nearest the answer — then both
answers keep their first L - prompt tokens. A pair whose answers become identical is dropped (no signal).
"""

from __future__ import annotations

import logging
from typing import Any

from loraforge.checkpoints import verify_dir
from loraforge.data import dataset as data_mod
from loraforge.data.dataset import _render, _turns, iter_records
from loraforge.data.prepare import Prepared, plan_for_lengths, warn_if_system_prompt_dropped
from loraforge.errors import UserError
from loraforge.model.modeling import base_model_dir, load_tokenizer
from loraforge.plan.planner import CPU_EXECUTION_NOTE

log = logging.getLogger("loraforge")
FIELDS = ("prompt", "chosen", "rejected")


def is_preference(row: dict[str, Any]) -> bool:
    return "chosen" in row and "rejected" in row


def _text(value, origin: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{origin}: '{key}' is missing or empty; a preference record needs a prompt and two answers "
                        "(prompt, chosen, rejected)")
    return value


def _messages(value, origin: str, key: str) -> list[dict]:
    """A list of turns, one message object, or (answers only) a string, as normalised turns."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _turns(value, origin, "from", "value", key)
    return _turns(value, origin, "role", "content", key)


def _answer(value, origin: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, origin, key)}]
    return _messages(value, origin, key)


def normalise_pair(row: dict[str, Any], origin: str, system_prompt: str | None = None) -> tuple[list, list, list]:
    """(prompt turns, chosen answer turns, rejected answer turns) of one record; errors name `origin`."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise UserError(f"{origin}: '{key}' is missing; a preference record needs prompt, chosen and rejected")
    chosen, rejected = _answer(row["chosen"], origin, "chosen"), _answer(row["rejected"], origin, "rejected")
    if any(m["role"] != "assistant" for m in chosen) and chosen[0]["role"] != "assistant":
        # whole conversations: the turns both share are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n] and chosen[n]["role"] != "assistant":
            n += 1
        if n == 0:
            raise UserError(f"{origin}: 'chosen' and 'rejected' are whole conversations that share no opening turn; "
                            "give the prompt turns in both, or a separate 'prompt'")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif "conversations" in row and row.get("prompt") is None:
        prompt = _messages(row["conversations"], origin, "conversations")
    else:
        if row.get("prompt") is None:
            raise UserError(f"{origin}: 'prompt' is missing; a preference record needs prompt, chosen and rejected")
        p = row["prompt"]
        prompt = [{"role": "user", "content": _text(p, origin, "prompt")}] if isinstance(p, str) else _messages(p, origin, "prompt")
        if isinstance(row.get("system"), str) and row["system"].strip():
            prompt = [{"role": "system", "content": row["system"]}] + prompt
    if prompt[-1]["role"] == "assistant":
        raise UserError(f"{origin}: the prompt ends with an assistant turn; it should end with the turn the answers reply to")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
            raise UserError(f"{origin}: '{key}' has no assistant answer (empty, or only prompt turns)")
    if chosen == rejected:
        raise UserError(f"{origin}: 'chosen' and 'rejected' are the same answer, so there is no preference to learn; "
                        "remove the record")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt, chosen, rejected


def iter_pairs(sources, recipe):
    """Every source's records as (origin, prompt, chosen, rejected), streamed; a record that is not a preference
    pair stops with its line."""
    for src in sources:
        if src.format not in ("auto", "preference"):
            raise UserError(f"data.sources[].format: {src.format} is not a preference format; training.method "
                            f"{recipe.training.method} reads {{prompt, chosen, rejected}} pairs (format: auto or preference)")
        for rec in iter_records(src, recipe):
            if "chosen" not in rec.row and "rejected" not in rec.row:
                raise UserError(
                    f"{rec.origin}: not a preference record (keys {sorted(rec.row)}); training.method "
                    f"{recipe.training.method} needs 'chosen' and 'rejected' answers to a 'prompt' "
                    "(or whole conversations in chosen/rejected)")
            yield (rec.origin, *normalise_pair(rec.row, rec.origin, recipe.data.system_prompt))


def chosen_examples(sources, recipe) -> list[dict]:
    """The pairs as chats of the prompt and the chosen answer: what `loraforge eval` scores for a preference run
    (the same held-out split: data.eval_indices over the same records)."""
    return [{"messages": p + c} for _, p, c, _ in iter_pairs(sources, recipe)]


def render_pair(tokenizer, prompt: list, chosen: list, rejected: list, template: str | None = None,
                origin: str = "") -> dict[str, list[int]]:
    """Token ids of the prompt (with the generation prompt) and of each answer as the template continues it."""
    p_text = _render(tokenizer, prompt, template, True)
    out = {"prompt_ids": tokenizer(p_text, add_special_tokens=False)["input_ids"]}
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        full = _render(tokenizer, prompt + answer, template, False).rstrip()  # not the newline after end-of-turn
        if not full.startswith(p_text):
            raise UserError(f"{origin}: the chat template renders the prompt differently once an answer follows, so "
                            "the answer cannot be located; set data.chat_template to a prefix-stable template")
        out[f"{key}_ids"] = tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    return out


def truncate_pair(row: dict, max_len: int, max_prompt: int) -> tuple[dict | None, bool, bool]:
    """(row cut to `max_len` by the module's rule or None if its answers became identical, prompt cut, answer cut)."""
    p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    if len(p) + max(len(c), len(r)) <= max_len:
        return row, False, False
    prompt_cut = len(p) > max_prompt
    if prompt_cut:
        p = p[-max_prompt:]
    room = max(max_len - len(p), 0)
    answer_cut = max(len(c), len(r)) > room
    c, r = c[:room], r[:room]
    if c == r:
        return None, prompt_cut, answer_cut
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, prompt_cut, answer_cut


def max_prompt_tokens(recipe, max_len: int) -> int:
    p = recipe.preference.max_prompt_length if recipe.preference is not None else "auto"
    return max(1, max_len // 2) if p == "auto" else min(int(p), max_len - 1)


def check_start_adapter(recipe) -> None:
    """model.adapter_from must be a finished run of the same base with the recipe's LoRA shape."""
    src = recipe.model.adapter_from
    if src is None:
        return
    from pathlib import Path

    import yaml

    run = recipe.resolve_path(src)
    where = f"model.adapter_from: {src}"
    if not (run / "adapter_config.json").is_file() or not (run / "adapter_model.safetensors").is_file():
        raise UserError(f"{where}: no adapter there ({run}); give the directory of a finished loraforge run")
    if not (run / "train_summary.json").is_file() and (run / "recipe.yaml").is_file():
        raise UserError(f"{where}: that run has not finished; finish it first (run the same command again)")

    verify_dir(run)
    if (run / "recipe.yaml").is_file():
        theirs = yaml.safe_load((run / "recipe.yaml").read_text())
        base = (theirs.get("model") or {}).get("name_or_path")
        ours = recipe.model.name_or_path
        if base and base != ours and Path(str(base)).name != Path(ours).name:
            raise UserError(f"{where}: that adapter was trained on {base}, this recipe's model.name_or_path is {ours}; "
                            "use the same base")
        lora = theirs.get("lora") or {}
        for key in ("r", "alpha", "target_modules", "use_dora", "use_rslora"):
            mine = getattr(recipe.lora, key)
            if key in lora and lora[key] != mine:
                raise UserError(f"lora.{key}: {mine!r} differs from the adapter in model.adapter_from ({lora[key]!r}); "
                                "the run trains that adapter: set the same value")


def prepare_preference(recipe, hw, check_adapter: bool = True):
    """recipe + hardware -> tokenized preference pairs and the plan (data.prepare.Prepared). Read and validated
    first: a bad record stops here, before any model loads."""
    from datasets import Dataset

    if check_adapter:
        check_start_adapter(recipe)
    model_dir = base_model_dir(recipe)
    template = data_mod.resolve_chat_template(recipe)
    tokenizer = load_tokenizer(model_dir, recipe, template)
    warn_if_system_prompt_dropped(recipe, tokenizer, template)
    rows = _rendered_pairs(recipe, tokenizer)
    train_rows = [row for is_eval, row in rows if not is_eval]
    if not train_rows:
        raise UserError("data.sources: no preference pairs left for training; lower data.eval_split")
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train_rows]
    plan, shape = plan_for_lengths(recipe, hw, model_dir, lengths)
    max_prompt = max_prompt_tokens(recipe, plan.max_seq_length)
    out, stats = _truncated(rows, plan.max_seq_length, max_prompt)
    plan = _preference_plan(recipe, plan, max_prompt)

    def to_ds(items):
        return Dataset.from_dict({k: [r[k] for r in items] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})

    rule = {"max_seq_length": plan.max_seq_length, "max_prompt_length": max_prompt,
            "prompt_keeps": "end", "answers_keep": "start"}
    summary = stats | {"truncation": rule, "eval_pairs": len(out["eval"])}
    return Prepared(plan, tokenizer, to_ds(out["train"]), to_ds(out["eval"]) if out["eval"] else None, model_dir,
                    lengths, (stats["answers_truncated"], 0.0), shape, extra_summary={"preference": summary})


def _rendered_pairs(recipe, tokenizer) -> list[tuple[bool, dict]]:
    """(held out?, the pair rendered through the chat template) for every pair of the sources and eval sources."""
    d = recipe.data
    pairs = list(iter_pairs(d.sources, recipe))
    held = data_mod.eval_indices(len(pairs), d.eval_split, recipe.training.seed)
    extra = list(iter_pairs(d.eval_sources, recipe)) if d.eval_sources else []
    rows = [(i in held, render_pair(tokenizer, p, c, r, None, origin)) for i, (origin, p, c, r) in enumerate(pairs)]
    return rows + [(True, render_pair(tokenizer, p, c, r, None, origin)) for origin, p, c, r in extra]


def _truncated(rows, max_len: int, max_prompt: int) -> tuple[dict, dict]:
    """Every pair cut to `max_len` (prompt keeps its end, answers their start); pairs whose answers became
    identical dropped. Returns ({train, eval} rows, counts over the training pairs)."""
    stats = {"pairs": 0, "prompts_truncated": 0, "answers_truncated": 0, "dropped_identical_after_truncation": 0}
    out = {"train": [], "eval": []}
    for is_eval, row in rows:
        cut, p_cut, a_cut = truncate_pair(row, max_len, max_prompt)
        if not is_eval:
            stats["pairs"] += 1
            stats["prompts_truncated"] += p_cut
            stats["answers_truncated"] += a_cut
            stats["dropped_identical_after_truncation"] += cut is None
        if cut is not None:
            out["eval" if is_eval else "train"].append(cut)
    if stats["prompts_truncated"] or stats["answers_truncated"]:
        log.warning("preference pairs longer than max_seq_length %d: %d prompts cut to their last %d tokens, %d "
                    "pairs' answers cut; %d pairs dropped (answers identical after the cut)", max_len,
                    stats["prompts_truncated"], max_prompt, stats["answers_truncated"],
                    stats["dropped_identical_after_truncation"])
    if not out["train"]:
        raise UserError(f"data.sources: every pair's answers are identical within max_seq_length {max_len}; "
                        "raise data.max_seq_length or lower preference.max_prompt_length")
    return out, stats


def _preference_plan(recipe, plan, max_prompt: int):
    """The plan as the preference step runs it: trl's DPOTrainer runs a micro-batch's pairs padded in one forward
    through its fused LM head (the SFT row packing and plain head do not apply); the truncation rule noted."""
    from dataclasses import replace

    note = (f"{recipe.training.method}: each pair is two sequences (prompt + chosen, prompt + rejected) in one forward"
            + (" plus a reference forward without gradients" if recipe.training.method == "dpo" else "")
            + f"; truncation: the prompt keeps its last {max_prompt} tokens, the answers their first tokens up to "
            f"{plan.max_seq_length} in all")
    notes = tuple(n for n in plan.notes if n != CPU_EXECUTION_NOTE) + (note,)
    return replace(plan, notes=notes, rows_per_forward=None, loss_head="fused")
