"""Trace one DPO / ORPO training step under torch's FakeTensorMode, as model/trace.py traces an SFT step.

The step is the trainer's own code, not a rewrite: the model is prepared as trl's DPOTrainer prepares the
PeftModel loraforge gives it (trl 1.16 dpo_trainer.py: the frozen "ref" copy of the adapter, dropout disabled,
the fused LM head with DPO's outputs), and the loss is trl's `DPOTrainer._compute_loss` (DPO: the policy forward
on the concatenated chosen + rejected rows, the reference forward under no_grad with the adapter disabled or the
"ref" adapter set, or the precomputed reference log-probs from the batch) or loraforge's
`PreferenceTrainer._orpo_loss` (ORPO), each called on a stand-in for the trainer that holds the attributes they
read. What model/trace.py does for CUDA (dropout mask, 4-bit dequantisation, in-place fused-head fold, the
padding mask) holds here too. Two more fake-tensor corrections, for the trainer's metrics only:

* `.item()` (trl's and loraforge's logged metrics, `if total_tokens > 0`) cannot read a fake value: it returns 1.
* boolean-mask indexing (trl's `logits/chosen` and token accuracy metrics) has a data-dependent size: the trace
  takes every position as selected (the largest such temporary, a few bytes per token).

The batch is what trl's DataCollatorForPreference makes of `micro_batch` pairs: 2 x micro_batch rows (the chosen
rows, then the rejected ones) of `seq_len` tokens, with an attention mask (chosen and rejected differ in length,
so a real batch is padded) and the completion mask; with precomputed reference log-probs, one per row.
"""

from __future__ import annotations

import time
from collections import defaultdict
from types import SimpleNamespace

from loraforge.model.trace import (
    LiveBytes,
    TraceResult,
    autocast,
    check_traceable,
    cuda_like,
    fake_training_state,
    lora_model,
    optimizer_step,
    torch_dtype,
    trl_ready,
)
from loraforge.plan.memory import ModelShape, TrainSetup

# The per-token outputs trl's DPOTrainer asks its fused LM head for (dpo_trainer.py, no WPO weighting)
DPO_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def trace_preference_step(shape: ModelShape, setup: TrainSetup, steps: int = 2) -> TraceResult:
    """Peak live tensor bytes of `steps` optimizer steps of the preference step `setup` (objective dpo / orpo)."""
    check_traceable(setup)
    if setup.objective not in ("dpo", "orpo"):
        raise ValueError("trace_preference_step traces objective dpo or orpo (trace_step traces sft)")
    t0 = time.time()
    live = LiveBytes()
    model = _dpo_trainer_model(shape, setup)
    fake_mode, trainable, optimizer = fake_training_state(model, setup, live)
    batch = _fake_pairs(setup, fake_mode, live)
    trainer = _trainer_stand_in(model, setup)
    _phase_per_forward(model, live)
    with cuda_like(setup, fake_mode, live), _metric_reads():
        for _ in range(steps):
            live.phase = "activations"
            with autocast(setup):
                loss = _loss(trainer, model, batch, setup)
            live.phase = "backward"
            loss.backward()
            del loss
            optimizer_step(optimizer, trainable, live)
    del model, optimizer, trainer
    return TraceResult(live.peak, live.at_peak, dict(live.phase_peaks), time.time() - t0)


def _dpo_trainer_model(shape: ModelShape, setup: TrainSetup):
    """The model as trl's DPOTrainer trains it (dpo_trainer.py __init__): given a PeftModel and no ref_model it
    adds the "ref" adapter as a copy of "default" (loraforge keeps it frozen for reference start, deletes it for
    base: run/preference._set_reference), then the SFT-like preparation (trl_ready), dropout disabled
    (DPOConfig.disable_dropout, loraforge's default) and its fused head outputs."""
    from trl.trainer.utils import disable_dropout_in_model

    model = lora_model(shape, setup, torch_dtype(setup))
    if setup.ref_adapter:
        import torch

        with torch.device("meta"):
            model.add_adapter("ref", model.peft_config["default"])
        for name, p in model.named_parameters():
            if ".ref." in name:
                p.requires_grad_(False)
    model = trl_ready(model, setup, DPO_HEAD_OUTPUTS)
    disable_dropout_in_model(model)
    return model


def _phase_per_forward(model, live: LiveBytes) -> None:
    """Count what the reference forward (the model called under no_grad) allocates as phase "reference"."""
    import torch

    def phase(_module, _args):
        if live.phase in ("activations", "reference"):
            live.phase = "activations" if torch.is_grad_enabled() else "reference"

    model.register_forward_pre_hook(phase)


def _trainer_stand_in(model, setup: TrainSetup):
    """The attributes of DPOTrainer / PreferenceTrainer that their loss functions read, as loraforge's
    run/preference.training_args sets them (sigmoid loss, reverse KL, no length-desensitising, no WPO)."""
    def same(x):  # one process: gathering is the identity
        return x

    accelerator = SimpleNamespace(device="cpu", unwrap_model=same, gather=same, gather_for_metrics=same)
    return SimpleNamespace(
        model=model, ref_model=None, accelerator=accelerator, beta=0.1, label_smoothing=0.0,
        loss_types=["sigmoid"], loss_weights=[1.0], f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        ld_alpha=None, use_weighting=False, aux_loss_enabled=False, router_aux_loss_coef=0.0,
        precompute_ref_logps=setup.reference == "precomputed", lf_method=setup.objective,
        args=SimpleNamespace(gradient_checkpointing_kwargs={"use_reentrant": False}),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )


def _loss(trainer, model, batch: dict, setup: TrainSetup):
    """The trainer's own loss on the batch: trl's DPOTrainer._compute_loss, or loraforge's ORPO loss."""
    if setup.objective == "orpo":
        from loraforge.run.preference import PreferenceTrainer

        return PreferenceTrainer._orpo_loss(trainer, model, batch)
    from trl import DPOTrainer

    return DPOTrainer._compute_loss(trainer, model, batch, False)


def _fake_pairs(setup: TrainSetup, fake_mode, live: LiveBytes) -> dict:
    """One micro-batch as DataCollatorForPreference pads it: input ids, attention and completion masks of
    2 x micro_batch rows; the precomputed reference log-probs when the reference is precomputed."""
    import torch

    rows, s = 2 * setup.micro_batch, setup.seq_len
    with fake_mode:
        batch = {"input_ids": torch.zeros(rows, s, dtype=torch.long, device="cpu"),
                 "attention_mask": torch.ones(rows, s, dtype=torch.long, device="cpu"),
                 "completion_mask": torch.ones(rows, s, dtype=torch.long, device="cpu")}
        if setup.reference == "precomputed" and setup.objective == "dpo":
            batch["ref_chosen_logps"] = torch.zeros(setup.micro_batch, device="cpu")
            batch["ref_rejected_logps"] = torch.zeros(setup.micro_batch, device="cpu")
    for t in batch.values():
        live.track(t, "activations")
    return batch


def _metric_reads():
    """A dispatch mode above the trace's: `.item()` returns 1 and a boolean-mask index selects every position
    (the metrics' reads of values a fake tensor does not have; module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 1
            if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                return func(args[0], _all_selected(args[1]), **kwargs)
            return func(*args, **kwargs)

    return Mode()


def _all_selected(indices) -> list:
    """Boolean index tensors as the integer indices of every position (each bool index of d dims -> d long)."""
    import torch

    out = []
    for i in indices:
        if i is not None and i.dtype == torch.bool:
            out += [torch.zeros(i.numel(), dtype=torch.long, device="cpu")] * i.dim()
        else:
            out.append(i)
    return out
