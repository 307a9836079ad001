"""The finished adapter: saved complete under every strategy, and checked before a run counts as finished.

Under FSDP the checkpoints stay sharded (fast, and what resume reads), but `Trainer.save_model` writes
nothing at all with `SHARDED_STATE_DICT` (transformers trainer.py, `save_model`: the FSDP branch saves only
for FULL_STATE_DICT). So the final save switches the plugin to FULL_STATE_DICT first, as peft's FSDP guide
and axolotl do; the gather is collective, every rank calls it. Then every rank checks the written files
(they exist, load, have every trainable tensor at its full shape, and are finite) and the ranks agree,
before `train_summary.json` marks the run finished.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from loraforge.errors import UserError
from loraforge.run.memguard import any_rank
from loraforge.rundir import ADAPTER_FILE

log = logging.getLogger("loraforge")


def save_adapter(trainer, run_dir: Path) -> None:
    """`trainer.save_model(run_dir)` on every rank, with FSDP switched to a full (gathered) state dict."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    previous = getattr(plugin, "state_dict_type", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(previous):
        plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        if plugin is not None:
            # what save_model does for FULL_STATE_DICT (gather on every rank, rank 0 writes), making sure every
            # tensor is whole: on a CPU/gloo mesh torch's get_model_state_dict(full_state_dict=True) handed back
            # DTensor shards, which peft's save then fails on ("invalid python storage")
            state = trainer.accelerator.get_state_dict(trainer.model)
            state = {k: _full(v) for k, v in state.items()}  # same order on every rank: the gathers pair up
            if trainer.args.should_save:
                trainer._save(str(run_dir), state_dict=state)
        else:
            trainer.save_model(str(run_dir))
    finally:
        if plugin is not None and previous is not None and plugin.state_dict_type != previous:
            plugin.state_dict_type = previous
            plugin.state_dict_config = plugin.optim_state_dict_config = None
            plugin.set_state_dict_type()


def _full(t):
    """A whole, self-owned CPU tensor: a DTensor gathered (collective), anything else copied."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone().contiguous()


def _full_shape(param) -> tuple[int, ...]:
    """A parameter's logical shape: ZeRO-3 keeps `ds_shape` (the local tensor is empty), FSDP2 a DTensor."""
    if hasattr(param, "ds_shape"):
        return tuple(param.ds_shape)
    return tuple(param.shape)  # a DTensor reports its global shape


def expected_shapes(model, converted: bool = False) -> Counter:
    """The multiset of trainable tensors' full shapes: what a complete adapter file holds. `converted`: an
    OLoRA/PiSSA adapter saved as a plain LoRA over the original base, whose rank doubles (peft's
    path_initial_model_for_weight_conversion stacks the trained and the initial factors)."""
    shapes = Counter()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = _full_shape(p)
        if converted and "lora_A" in name:
            shape = (2 * shape[0],) + shape[1:]
        elif converted and "lora_B" in name:
            shape = (shape[0], 2 * shape[1]) + shape[2:]
        shapes[shape] += 1
    return shapes


def adapter_problem(run_dir: Path, expected: Counter) -> str | None:
    """What is wrong with the saved adapter, or None. Pure given the files."""
    path = Path(run_dir) / ADAPTER_FILE
    if not path.is_file():
        return f"{path} was not written"
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a broken adapter
        return f"{path} does not load ({str(e).splitlines()[0][:120]})"
    import torch

    shapes = Counter(tuple(t.shape) for t in tensors.values())
    if shapes != expected:
        missing = expected - shapes
        extra = shapes - expected
        return (f"{path} holds {sum(shapes.values())} tensors, {sum(expected.values())} expected "
                f"(missing shapes {dict(missing) or 'none'}, unexpected {dict(extra) or 'none'})")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"{path}: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]})"
    return None


def check_saved_adapter(trainer, run_dir: Path) -> None:
    """Stop (on every rank together) unless the adapter in `run_dir` is complete; nothing marks the run
    finished then, and a rerun resumes from the last checkpoint."""
    trainer.accelerator.wait_for_everyone()  # rank 0 has finished writing
    model = trainer.accelerator.unwrap_model(trainer.model)
    converted = getattr(trainer, "_lf_initial", None) is not None  # trainer.py: OLoRA/PiSSA saved converted
    problem = adapter_problem(run_dir, expected_shapes(model, converted))
    failed = any_rank(problem is not None)
    if failed:
        raise UserError(
            f"the trained adapter was not saved completely: {problem or 'another rank found it incomplete'}; the run is "
            "not marked finished; rerun the same command to resume from the last checkpoint"
        )
