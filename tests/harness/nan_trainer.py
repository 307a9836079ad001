"""The tests' one NaN-poisoning trainer: `nan_at(step)` is loraforge's LoraTrainer whose loss of optimizer step
`step` (1-based) is multiplied by NaN on every rank, in training only (evaluation is left alone), so the
gradients of that step are NaN — what a diverging run produces.

Used in-process (`monkeypatch.setattr(loraforge.run.trainer, "LoraTrainer", nan_at(3))`, tests/test_resume.py)
and by sitecustomize.py (LORAFORGE_TEST_NAN_AT_STEP) in every process a multi-process test starts."""

from __future__ import annotations

from loraforge.run.trainer import LoraTrainer


class NanLossTrainer(LoraTrainer):
    nan_step = 0  # 1-based optimizer step whose loss becomes NaN (0: none)

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        if self.model.training and self.state.global_step + 1 == self.nan_step:
            loss = (loss[0] * float("nan"),) + tuple(loss[1:]) if isinstance(loss, tuple) else loss * float("nan")
        return loss


def nan_at(step: int) -> type[NanLossTrainer]:
    return type("NanLossTrainer", (NanLossTrainer,), {"nan_step": step})
