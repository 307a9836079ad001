"""Decisions read off a validated recipe, in plain Python (no pydantic): the planner and `check-gpu` import them,
and `check-gpu` must run on a GPU node's base image, which has no pydantic (tests/test_gpu_check.py).

The recipe object is duck-typed: anything with the Recipe's attributes (recipe.py builds it)."""

from __future__ import annotations

# Initialisations that move part of the base weight into the adapter (W_res = W - B0 A0): the final adapter
# is saved converted to a plain LoRA over the original base (peft's path_initial_model_for_weight_conversion).
MUTATING_INITS = ("olora", "pissa")


def reference_kind(recipe) -> str:
    """What the DPO reference is: 'start' (frozen copy of the starting adapter) or 'base' (adapter disabled).
    ORPO has none. The trainer (run/preference.py) and the memory model (plan/planner.py) read it here."""
    p = recipe.preference
    fresh = recipe.model.adapter_from is None
    if recipe.training.method == "orpo":
        return "none"
    if p.reference != "auto":
        return p.reference
    # a fresh default/gaussian LoRA has B = 0: the adapter-disabled model is exactly the starting policy
    return "base" if fresh and recipe.lora.init not in MUTATING_INITS else "start"


def keeps_reference_adapter(recipe) -> bool:
    """Whether trl's frozen "ref" copy of the adapter stays loaded: DPO's start reference, and ORPO after an SFT
    run (to report the starting policy)."""
    method = recipe.training.method
    return (method == "dpo" and reference_kind(recipe) == "start") or \
        (method == "orpo" and recipe.model.adapter_from is not None)
