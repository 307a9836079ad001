"""Which distributed strategy: the names, what each can train, what the launcher's environment says.

Pure decisions on plain values (the launcher and the planner both ask here; hardware detection reads the
launched strategy from accelerate's environment through `strategy_from_env`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.errors import UserError

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3-offload")


def quant_mode(quantized: bool | str) -> str:
    """The recipe's quantization.mode ("none", "4bit", "8bit"); a bare bool means none / 4-bit."""
    if isinstance(quantized, str):
        return quantized
    return "4bit" if quantized else "none"


def choose_strategy(requested: str, world_size: int, quantized: bool | str,
                    fits_replicated: bool | None = None) -> tuple[str, str]:
    """(strategy, why). `quantized`: quantization.mode (or a bool: 4-bit or not). `fits_replicated`: does the
    whole base + a step fit on one device (the plan's verdict)."""
    mode = quant_mode(quantized)
    if requested != "auto":
        if requested not in STRATEGIES:
            raise UserError(f"--strategy {requested}: use one of auto, {', '.join(STRATEGIES)}")
        check_supported(requested, quantized)
        if requested == "single" and world_size > 1:
            raise UserError(f"--strategy single runs one process, but {world_size} were asked; use ddp")
        return requested, "as asked"
    if world_size == 1:
        return "single", "one process"
    if fits_replicated is None or fits_replicated:
        return "ddp", "the model fits on one device: replicate it (DDP)"
    if mode == "8bit":
        raise UserError(
            "the 8-bit base does not fit on one device, and an 8-bit base cannot be sharded (FSDP needs 4-bit, "
            "ZeRO-3 no quantization): set quantization.mode: 4bit (FSDP + QLoRA) or none (ZeRO-3), or use larger GPUs"
        )
    if mode != "none":
        return "fsdp", "the quantized base does not fit on one device: shard it with FSDP (QLoRA-compatible)"
    return "zero3", "the base does not fit on one device: shard weights, gradients and optimizer with ZeRO-3"


def check_supported(strategy: str, quantized: bool | str) -> None:
    """Refuse, in one line, the strategy/quantization pairs peft, bitsandbytes and DeepSpeed cannot train."""
    mode = quant_mode(quantized)
    if mode == "8bit" and strategy == "fsdp":
        # bitsandbytes' Int8Params hold int8 data with a separate scale (SCB) that FSDP cannot flatten/shard;
        # only 4-bit weights stored in a float dtype (bnb_4bit_quant_storage) shard (LLaMA-Factory allows 4-bit only).
        raise UserError(
            "strategy fsdp with an 8-bit base (quantization.mode: 8bit) is not supported: FSDP shards only 4-bit "
            "bases; set quantization.mode: 4bit (FSDP + QLoRA), or use --strategy ddp (8-bit, replicated)"
        )
    if mode != "none" and strategy in ("zero3", "zero3-offload"):
        raise UserError(
            f"strategy {strategy} with a quantized (QLoRA) base is not supported by peft/DeepSpeed; "
            "use --strategy fsdp (FSDP + QLoRA) or quantization.mode: none"
        )


def strategy_from_env(environ=None) -> str:
    """The strategy this process was launched with, read from accelerate's environment variables."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        offload = False
        cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if cfg_file and Path(cfg_file).is_file():
            try:
                zero = json.loads(Path(cfg_file).read_text()).get("zero_optimization", {})
                stage = stage or str(zero.get("stage", ""))
                offload = zero.get("offload_optimizer", {}).get("device", "none") != "none" or zero.get(
                    "offload_param", {}
                ).get("device", "none") != "none"
            except (OSError, ValueError):
                pass
        if stage == "3":
            return "zero3-offload" if offload else "zero3"
        return f"zero{stage}" if stage in ("1", "2") else "zero2"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp" if world > 1 else "single"


CONFIG_ENV = "LORAFORGE_ACCELERATE_CONFIG"  # the accelerate config file the launcher used (read back by launch_record)


def launched_strategy(hw) -> str:
    """The strategy this process was launched under: "single" for one process, else what the launcher's
    environment says (hardware.detect read it into `hw.strategy`), "ddp" when it says nothing."""
    if hw.world_size <= 1:
        return "single"
    strategy = getattr(hw, "strategy", None) or strategy_from_env()
    return "ddp" if strategy == "single" else strategy
