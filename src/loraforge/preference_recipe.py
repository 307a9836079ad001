"""The recipe's preference keys: `training.method: dpo | orpo` and the `preference:` section.

    training:
      method: dpo               # sft (default) | dpo | orpo
    model:
      adapter_from: runs/quickstart   # optional: a finished SFT run directory; its adapter is the start
    preference:
      beta: 0.1                 # DPO: how far from the reference; ORPO: the weight of the odds-ratio term
      loss_type: sigmoid        # DPO only: sigmoid (DPO), ipo, hinge, robust, sigmoid_norm (length-normalised)
      reference: auto           # DPO only: auto | start | base
      label_smoothing: 0.0      # DPO only, loss_type robust
      sft_weight: 0.0           # DPO only: + weight x the chosen answers' NLL (RPO); 0 = plain DPO
      max_prompt_length: auto   # prompt tokens kept (from the end); auto = half of data.max_seq_length

Every key is validated like the rest of the recipe; `check(recipe)` adds the cross-key rules (a key of another
method, a preference section on an SFT recipe, an adapter_from without a preference method), each one line
naming the key.

Reference (DPO): with LoRA no second copy of the base is ever made. `start` = a frozen copy of the adapter the
run starts from (trl's "ref" adapter: only r x (d_in + d_out) weights per target layer); `base` = the same
weights with the adapter disabled (peft `disable_adapter`). `auto` = `start` when the run starts from an SFT run
(the reference of DPO is the SFT policy: the base would pull the policy back to before SFT), `base` for a fresh
adapter (B = 0: the adapter-disabled model *is* the starting policy, and no copy is needed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

METHODS = ("sft", "dpo", "orpo")
PREFERENCE_METHODS = ("dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
DPO_ONLY = ("loss_type", "reference", "label_smoothing", "precompute_reference", "sft_weight")


class PreferenceSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    beta: float = Field(0.1, gt=0, le=100, description="DPO: the KL strength (higher = closer to the reference); "
                        "ipo: its tau; ORPO: the weight of the odds-ratio term beside the chosen NLL.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"] = Field(
        "sigmoid", description="DPO only: sigmoid (the DPO paper), ipo, hinge (SLiC), robust (noisy labels, with "
        "label_smoothing), sigmoid_norm (per-token normalised log-ratios).")
    reference: Literal["auto", "start", "base"] = Field(
        "auto", description="DPO only: the reference policy. start = a frozen copy of the starting adapter; "
        "base = the adapter disabled; auto = start after an SFT run (model.adapter_from), base otherwise.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO only, loss_type robust: the share of "
                                   "preference labels assumed flipped.")
    sft_weight: float = Field(0.0, ge=0, le=100, description="DPO only: weight of the chosen answers' NLL added to "
                              "the DPO loss (RPO; trl's loss_type 'sft'). DPO alone can widen the margin by "
                              "pushing the rejected answers down while the chosen ones are generated no more "
                              "often; this term also raises the chosen answers' own likelihood. 0 = plain DPO.")
    precompute_reference: bool = Field(False, description="DPO only: compute the reference log-probs once before "
                                       "training (saves the reference forward in every step).")
    max_prompt_length: int | Literal["auto"] = Field(
        "auto", description="Prompt tokens kept when prompt + answer exceed data.max_seq_length (the end of the "
        "prompt is kept); auto = half of max_seq_length. Answers are then cut to what is left (their start kept).")

    @field_validator("max_prompt_length")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v


def check(recipe, fields_set: dict) -> tuple[tuple, str] | None:
    """The cross-key rules: (key path, message) of the first broken one, or None. `fields_set`: the keys the
    recipe gave explicitly, per section ({"preference": {...}, "model": {...}})."""
    method = recipe.training.method
    pref_keys = fields_set.get("preference")
    if method == "sft":
        if pref_keys is not None:
            return ("preference",) + tuple(pref_keys[:1]), "only used by a preference method; set training.method: dpo or orpo, or remove the section"
        if recipe.model.adapter_from is not None:
            return ("model", "adapter_from"), ("starting from an adapter is offered for training.method dpo or orpo; "
                                               "remove it for SFT")
        return None
    if recipe.preference is None:  # the method's defaults
        recipe.preference = PreferenceSection()
    p = recipe.preference
    if method == "orpo":
        for key in DPO_ONLY:
            if key in (pref_keys or ()):
                why = ("ORPO needs no reference model" if key in ("reference", "precompute_reference") else
                       "ORPO's loss already holds the chosen answers' NLL" if key == "sft_weight" else "ORPO has one loss")
                return ("preference", key), f"only used by training.method dpo ({why}); remove it"
    if method == "dpo":
        if p.label_smoothing and p.loss_type != "robust":
            return ("preference", "label_smoothing"), (f"only used by loss_type robust (this recipe has "
                                                       f"{p.loss_type}); remove it or set loss_type: robust")
    if recipe.data.packing:
        return ("data", "packing"), "not used by a preference method (each pair is two sequences); remove it"
    if recipe.data.loss_on != "assistant":
        return ("data", "loss_on"), "a preference method scores the answers only; remove it"
    return None
