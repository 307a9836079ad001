"""Preference tuning (training.method dpo / orpo): trl's DPOTrainer with what loraforge's SFT trainer adds.

- The model is loaded, quantized and given LoRA exactly as for SFT (modeling.py); with `model.adapter_from`
  the finished SFT run's adapter is loaded trainable instead of a fresh one (`add_adapter`).
- DPO's reference, with no second copy of the base (pref_recipe.py): trl's DPOTrainer, given a PeftModel and
  no ref_model, copies the adapter into a frozen "ref" adapter and scores the reference under it
  (`use_adapter(model, "ref")`); for `reference: base` (and a fresh adapter under `auto`) loraforge removes that
  copy, and trl then scores the reference with the adapter disabled (`use_adapter(model, None)` ->
  `disable_adapter()`). Either way the base weights exist once.
- ORPO (Hong et al. 2024, reference-free): the same trainer, data and collator with the loss replaced —
  NLL of the chosen answer (mean over its tokens) minus beta * mean log sigmoid(log odds(chosen) - log
  odds(rejected)) over per-token-averaged log-probs — as trl.experimental.orpo computes it (checked in the
  tests against its `odds_ratio_loss`), without its separate, older data pipeline. No reference forward.
- The same callbacks as SFT (metrics.jsonl, NaN guard, progress bar, preemption, memory report) come from
  train._run; here: crash-safe staged checkpoints (checkpoints.py, as trainer.py does for SFT), tokens/s and
  peak memory in every log, the final adapter saved without the "ref" copy, the quantized-adapter dtype rule.
- After training, `preference_report` scores the pairs (held-out ones if any, else the training ones) with
  the starting policy and the trained one: the share where the chosen answer gets the higher mean per-token
  log-prob, the mean margin, and DPO's implicit-reward accuracy and margin against the reference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from loraforge.errors import UserError
from loraforge.model.modeling import add_lora
from loraforge.model.quant import (
    adapter_dtype,
    is_quantized,
    keep_adapter_dtype,
    training_ready,
)
from loraforge.recipe_rules import keeps_reference_adapter
from loraforge.run.sftconfig import training_arguments
from loraforge.run.trainer import StagedCheckpoints, fall_back_optimizer, peak_memory_gib, precision_label
from loraforge.use.infer import answer

log = logging.getLogger("loraforge")
REPORT_FILE = "preference.json"
REF = "ref"  # trl's name for the frozen copy of the starting adapter


def training_args(recipe, plan, run_dir: Path, report_to):
    """The DPOConfig for this plan: the general arguments every loraforge trainer gets (sftconfig), the preference
    keys, and no trl data preparation (data/pairs.py tokenized and truncated the pairs)."""
    from trl import DPOConfig

    p = recipe.preference
    dpo = recipe.training.method == "dpo"
    return DPOConfig(
        **training_arguments(recipe, plan, run_dir, report_to),
        beta=p.beta,
        **loss_settings(recipe),
        precompute_ref_log_probs=bool(dpo and p.precompute_reference),
        disable_dropout=True,
    )


def loss_settings(recipe) -> dict:
    """DPOConfig's loss keys. DPO: the recipe's loss_type, plus trl's "sft" term (the chosen answers' NLL, mean
    over their tokens in the micro-batch) weighted by sft_weight when it is set. ORPO replaces the loss
    (PreferenceTrainer._orpo_loss); trl's keys stay at their plain values there."""
    p = recipe.preference
    if recipe.training.method != "dpo":
        return {"loss_type": ["sigmoid"], "loss_weights": None, "label_smoothing": 0.0}
    if p.sft_weight:
        return {"loss_type": [p.loss_type, "sft"], "loss_weights": [1.0, p.sft_weight],
                "label_smoothing": p.label_smoothing}
    return {"loss_type": [p.loss_type], "loss_weights": None, "label_smoothing": p.label_smoothing}


def add_adapter(model, recipe, gradient_checkpointing: bool, zero3: bool = False):
    """A fresh LoRA (modeling.add_lora), or the adapter of `model.adapter_from` loaded trainable; returns
    (peft model, trainable, total)."""
    if recipe.model.adapter_from is None:
        return add_lora(model, recipe.lora, recipe.quantization.mode, gradient_checkpointing, zero3=zero3)
    from peft import PeftModel, prepare_model_for_kbit_training

    if recipe.quantization.mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    path = str(recipe.resolve_path(recipe.model.adapter_from))
    model = PeftModel.from_pretrained(model, path, is_trainable=True, autocast_adapter_dtype=not zero3)
    trainable, total = model.get_nb_trainable_parameters()
    return model, trainable, total


def orpo_loss(chosen_avg, rejected_avg, chosen_nll, beta: float):
    """ORPO's loss from per-token-averaged log-probs (Hong et al. 2024, eqs. 4-7, as trl.experimental.orpo):
    (loss, log sigmoid(log odds ratio) per pair, log odds ratio per pair)."""
    import torch.nn.functional as F

    c, r = chosen_avg.float(), rejected_avg.float()

    def log1mexp(x):  # log(1 - exp(x)) for x < 0, stable
        return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - beta * ratio.mean(), ratio, log_odds


class PreferenceTrainer(StagedCheckpoints, DPOTrainer):
    """trl's DPOTrainer with what loraforge adds: ORPO's loss in the same pipeline, tokens/s and peak memory in
    every log, staged crash-safe checkpoints, only the trained adapter saved, the before/after report."""

    _lf_last = None
    lf_report: dict | None = None
    lf_reference: str | None = None

    def __init__(self, *args, lf_recipe=None, **kwargs):
        self.lf_recipe = lf_recipe
        self.lf_method = lf_recipe.training.method
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # tokenized and truncated by pref_data.py
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.lf_method != "orpo":
            return super()._compute_loss(model, inputs, return_outputs)
        return self._orpo_loss(model, inputs)

    def _orpo_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        out = model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        shift = mask[..., 1:]
        logps = out.log_probs[:, -shift.size(1):]
        sums, counts = (logps * shift).sum(1), shift.sum(1).clamp(min=1)
        c_sum, _ = sums.chunk(2)
        c_n, _ = counts.chunk(2)
        avg_c, avg_r = (sums / counts).chunk(2)
        nll = -c_sum.sum() / c_n.sum()
        loss, ratio, log_odds = orpo_loss(avg_c, avg_r, nll, self.beta)
        g = self.accelerator.gather
        m = self._metrics[mode]
        rc, rr = self.beta * avg_c.detach(), self.beta * avg_r.detach()
        m["rewards/chosen"].append(g(rc).mean().item())
        m["rewards/rejected"].append(g(rr).mean().item())
        m["rewards/accuracies"].append(g((rc > rr).float()).mean().item())
        m["rewards/margins"].append(g(rc - rr).mean().item())
        m["nll_loss"].append(g(nll.detach().view(1)).mean().item())
        m["log_odds_ratio"].append(g(ratio.detach()).mean().item())
        m["log_odds_chosen"].append(g(log_odds.detach()).mean().item())
        if mode == "train":
            self._total_train_tokens += int(g(inputs["attention_mask"].sum().view(1)).sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs:
            now, tokens = time.time(), self._total_train_tokens
            if self._lf_last is not None and now > self._lf_last[0]:
                logs["tokens_per_second"] = (tokens - self._lf_last[1]) / (now - self._lf_last[0])
            self._lf_last = (now, tokens)
            logs["peak_memory_gib"] = peak_memory_gib()[0]
        super().log(logs, start_time)

    def training_step(self, *a, **k):
        if self._lf_last is None:
            self._lf_last = (time.time(), self._total_train_tokens)
        return super().training_step(*a, **k)

    def _save(self, output_dir=None, state_dict=None):
        """Only the trained adapter ("default"): the frozen reference copy is not part of the result."""
        peft_model = self.accelerator.unwrap_model(self.model)
        if REF not in getattr(peft_model, "peft_config", {}):
            return super()._save(output_dir, state_dict)
        original = peft_model.save_pretrained

        def save_default(*a, **k):
            k.setdefault("selected_adapters", ["default"])
            return original(*a, **k)

        peft_model.save_pretrained = save_default
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del peft_model.save_pretrained

    def lf_probe(self, micro: int, seq: int, vocab: int, pad_id: int, device) -> None:
        """The OOM pre-flight's step (run/memguard.py) as this trainer runs it: `micro` pairs whose prompt +
        chosen and prompt + rejected are `seq` tokens each, through trl's own loss (the reference forward
        included unless precomputed), then backward. What it logs is dropped: no training step ran."""
        g = torch.Generator().manual_seed(0)
        prompt, answer = seq // 2, seq - seq // 2

        def ids(n):
            return torch.randint(0, vocab, (n,), generator=g).tolist()

        pairs = [{"prompt_ids": ids(prompt), "chosen_ids": ids(answer), "rejected_ids": ids(answer)}
                 for _ in range(micro)]
        if self.precompute_ref_logps:
            pairs = [p | {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in pairs]
        batch = {k: v.to(device) for k, v in self.data_collator(pairs).items()}
        tokens = self._total_train_tokens
        with self.compute_loss_context_manager():
            loss = self.compute_loss(self.model, batch)
        loss.backward()
        self._total_train_tokens = tokens
        for metrics in self._metrics.values():
            metrics.clear()

    def create_model_card(self, *a, **k):  # card.py writes the run's README
        return None

    def train(self, *a, **k):
        out = super().train(*a, **k)
        if self.state.global_step >= self.state.max_steps:
            self.lf_report = preference_report(self, self.lf_recipe, self.processing_class)
        return out


def make_trainer(recipe, model, args, tokenizer, train_ds, eval_ds, callbacks):
    """The preference trainer, built as session.build_trainer builds the SFT one; the reference set as the
    recipe says (recipe_rules.reference_kind)."""
    if args is not None:
        fall_back_optimizer(args)
    training_ready(model)
    label = precision_label(args)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length)
    with keep_adapter_dtype(model, adapter_dtype("4bit" if is_quantized(model) else "none", label)):
        trainer = PreferenceTrainer(model=model, args=args, data_collator=collator, train_dataset=train_ds,
                                    eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
                                    lf_recipe=recipe)
    _set_reference(trainer, recipe)
    return trainer


def _set_reference(trainer, recipe) -> None:
    """trl copies the adapter as a frozen "ref" adapter; kept when the reference is the start adapter, deleted
    when it is the base (adapter disabled: no copy needed)."""
    method = recipe.training.method
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    has_ref = REF in peft_model.peft_config
    keep_ref = keeps_reference_adapter(recipe)
    if has_ref and not keep_ref:
        peft_model.delete_adapter(REF)
    elif keep_ref and not has_ref:
        raise UserError("preference.reference: start, but trl made no reference copy of the adapter here; "
                        "use reference: base")
    for name, p in peft_model.named_parameters():
        if f".{REF}." in name:
            p.requires_grad_(False)
    trainer.lf_reference = "start adapter (frozen copy)" if keep_ref and method == "dpo" else (
        "base (adapter disabled)" if method == "dpo" else "none (ORPO)")


# ------------------------------------------------------------------ before / after

MAX_REPORT_PAIRS = 256


def _scores(trainer, dataset, adapter: str | None | bool):
    """Per pair: (summed log-prob, answer tokens) of chosen and rejected under `adapter`: True = the trained
    adapter, None = adapters disabled, a name = that adapter. Every rank runs the same batches (sharded
    strategies gather in each forward)."""
    from trl.trainer.utils import use_adapter

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    model = trainer.model
    n = min(len(dataset), MAX_REPORT_PAIRS)
    bs = max(1, trainer.args.per_device_eval_batch_size)
    out = []
    ctx = contextlib.nullcontext() if adapter is True else use_adapter(peft_model, adapter)
    was_training = model.training
    model.eval()
    with torch.no_grad(), ctx:
        for i in range(0, n, bs):
            batch = trainer.data_collator([dataset[j] for j in range(i, min(n, i + bs))])
            batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
            mask = batch.pop("completion_mask")
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            with trainer.accelerator.autocast():
                lp = model(**batch, labels=labels, fused_lm_head=True, use_cache=False).log_probs
            shift = mask[..., 1:]
            lp = lp[:, -shift.size(1):].float()
            sums, counts = (lp * shift).sum(1), shift.sum(1)
            (sc, sr), (nc, nr) = sums.chunk(2), counts.chunk(2)
            out += list(zip(sc.tolist(), nc.tolist(), sr.tolist(), nr.tolist()))
    model.train(was_training)
    return out


def _summary(policy, reference=None, beta: float = 0.1) -> dict:
    import statistics

    pref = [c / max(nc, 1) > r / max(nr, 1) for c, nc, r, nr in policy]
    margin = [c / max(nc, 1) - r / max(nr, 1) for c, nc, r, nr in policy]
    out = {"chosen_preferred": round(sum(pref) / len(pref), 4), "mean_logp_margin": round(statistics.fmean(margin), 4)}
    if reference is not None:
        rewards = [beta * ((c - rc) - (r - rr)) for (c, _, r, _), (rc, _, rr, _) in zip(policy, reference)]
        out["reward_accuracy"] = round(sum(x > 0 for x in rewards) / len(rewards), 4)
        out["reward_margin"] = round(statistics.fmean(rewards), 4)
    return out


def preference_report(trainer, recipe, tokenizer) -> dict:
    """Before (the starting policy) and after (the trained one), on the held-out pairs if any, else the training
    pairs; written to preference.json on the main process."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    on_eval = trainer.eval_dataset is not None and len(trainer.eval_dataset) > 0
    ds = trainer.eval_dataset if on_eval else trainer.train_dataset
    start = REF if REF in peft_model.peft_config else None
    before = _scores(trainer, ds, start)
    after = _scores(trainer, ds, True)
    method = recipe.training.method
    reference = before if method == "dpo" else None  # DPO's reference is the start (or the base it equals)
    report = {
        "method": method,
        "reference": trainer.lf_reference,
        "pairs": len(before),
        "scored_on": "held-out pairs" if on_eval else "training pairs",
        "before": _summary(before, reference, trainer.beta),
        "after": _summary(after, reference, trainer.beta),
    }
    if start is not None and recipe.samples.prompts and trainer.is_world_process_zero() and \
            trainer.args.world_size == 1:
        from trl.trainer.utils import use_adapter

        model = peft_model
        model.eval()
        with use_adapter(model, start):
            report["start_answers"] = [
                {"prompt": q, "start": answer(model, tokenizer, q, recipe.samples.max_new_tokens, recipe.data.system_prompt)}
                for q in recipe.samples.prompts]
    if trainer.is_world_process_zero():
        path = Path(recipe.output_dir).expanduser() / REPORT_FILE
        path.write_text(json.dumps(report, indent=2) + "\n")
        b, a = report["before"], report["after"]
        log.info("preference (%s, %d %s): chosen preferred %.0f%% -> %.0f%%, mean log-prob margin %.3f -> %.3f%s",
                 method, report["pairs"], report["scored_on"], 100 * b["chosen_preferred"], 100 * a["chosen_preferred"],
                 b["mean_logp_margin"], a["mean_logp_margin"],
                 f", reward accuracy {100 * a['reward_accuracy']:.0f}%, reward margin {a['reward_margin']:.3f}"
                 if "reward_accuracy" in a else "")
    return report
