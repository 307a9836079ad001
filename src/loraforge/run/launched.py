"""What accelerate really set up in this training process, recorded in plan.json and checked against the launch."""

from __future__ import annotations

import os

from loraforge.errors import UserError
from loraforge.plan.strategy import CONFIG_ENV


def launch_record(accelerator, hw, environ=None) -> dict:
    """What really ran, as the training process sees it (plan.json's `launch`): accelerate's distributed type (DEEPSPEED,
    FSDP, MULTI_CPU, ...) and ZeRO stage, the world, and the accelerate config the launcher named."""
    env = os.environ if environ is None else environ
    state = accelerator.state
    ds = getattr(state, "deepspeed_plugin", None)
    zero = (ds.deepspeed_config or {}).get("zero_optimization", {}) if ds is not None else {}
    return {
        "accelerate_config": env.get(CONFIG_ENV),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "world_size": accelerator.num_processes,
        "num_nodes": hw.num_nodes,
        "zero_stage": getattr(ds, "zero_stage", zero.get("stage")) if ds is not None else None,
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device") if ds is not None else None,
        "offload_param": (zero.get("offload_param") or {}).get("device") if ds is not None else None,
        "strategy": hw.strategy or ("ddp" if hw.world_size > 1 else "single"),
    }


def check_launched(record: dict) -> None:
    """Stop (every rank, before training) when accelerate runs something else than the strategy launched: e.g.
    ACCELERATE_USE_CPU=1 makes AcceleratorState(cpu=True) skip DeepSpeed (state.py: `... == "true" and not cpu`)
    and train ZeRO jobs as plain MULTI_CPU DDP, silently."""
    strategy, got = record.get("strategy"), record.get("distributed_type")
    if strategy and strategy.startswith("zero") and got != "DEEPSPEED":
        hint = "; unset ACCELERATE_USE_CPU (it turns DeepSpeed off)" if os.environ.get("ACCELERATE_USE_CPU") else ""
        raise UserError(f"launched for {strategy} (DeepSpeed), but accelerate set up {got}{hint}")
