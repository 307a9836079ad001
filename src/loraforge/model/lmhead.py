"""loraforge's plain LM head: the loss of the labelled positions only, without the full logits.

trl's chunked fused head (GPUs) never holds the full logits, but off Triton its tiles are recomputed in the
backward and score every position; the plain head projects only the positions that carry a label (the CPU:
1.33x faster per step on SmolLM2-135M, 5x on a tiny model, benchmarks/throughput.py). Light: torch is imported
inside the function, so `loraforge check-gpu` and the trainer share it without trl (run/gpu_check.py, run/trainer.py).
"""

from __future__ import annotations

# Config attributes that scale or cap the logits: the plain head leaves such models to trl's fused head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def plain_head_supported(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(getattr(text, a, None) is None for a in _LOGIT_TRANSFORMS)


def add_plain_lm_head(model) -> None:
    """`model(..., shift_labels=..., lf_plain_head=True)` returns the summed NLL of the labelled positions
    (`nll_sum`), their count (`n_valid`) and how many the model ranks first (`n_correct`), projecting only
    those positions through the LM head. Any other call goes to the forward as it was (generation too)."""
    import functools
    import types

    import torch
    import torch.nn.functional as F

    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, lf_plain_head=False, shift_labels=None, **kwargs):
        if not lf_plain_head:
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        labels = shift_labels.to(hidden.device)
        mask = labels != -100
        logits = head(hidden[mask].to(head.weight.device)).float()
        target = labels[mask].to(logits.device)
        nll = F.cross_entropy(logits, target, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).sum()
        return {"nll_sum": nll, "n_valid": mask.sum(), "n_correct": correct}

    model.forward = types.MethodType(forward, model)
