"""Experiment tracking: W&B (online when logged in, offline otherwise) and TensorBoard, via the
Trainer's own integrations. loraforge sets their environment, keeps the W&B run id in the run
directory (a resumed or requeued job continues the same W&B run), and adds the resolved recipe, the
plan, the hardware and the library versions to the tracked config. Only the main process logs."""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

from transformers import TrainerCallback

from loraforge.errors import UserError
from loraforge.recipe import Recipe
from loraforge.rundir import TRACKING_FILE, read_json, write_json


def wandb_logged_in(environ=None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def report_to(recipe: Recipe) -> list[str] | str:
    """The Trainer's `report_to` for this recipe; stops with one line if a chosen tracker is not installed.
    Writes nothing (the training arguments are built before the run directory exists)."""
    t = recipe.tracking
    import importlib.util

    for backend, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if backend in t.backends and importlib.util.find_spec(package) is None:
            raise UserError(
                f"tracking.backend: {backend} is not installed; pip install '{package}' (or the loraforge[{backend}] "
                "extra), or set tracking.backend: none"
            )
    return t.backends or "none"


def configure(recipe: Recipe, run_dir: Path) -> list[str] | str:
    """Set the trackers' environment for this run (once the run directory exists); returns `report_to`."""
    t = recipe.tracking
    report = report_to(recipe)
    if "tensorboard" in t.backends:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "wandb" in t.backends:
        if not os.environ.get("WANDB_MODE") and not wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"  # never prompt for a key, never wait for a network
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_DIR"] = str(run_dir)  # offline runs land in the run directory
        os.environ["WANDB_PROJECT"] = t.project
        if t.entity:
            os.environ["WANDB_ENTITY"] = t.entity
        if t.group:
            os.environ["WANDB_RUN_GROUP"] = t.group
        if t.tags:
            os.environ["WANDB_TAGS"] = ",".join(t.tags)
        os.environ["WANDB_RUN_ID"] = run_id(run_dir)
        os.environ["WANDB_RESUME"] = "allow"  # same id after a resume or a SLURM requeue: the same W&B run
        os.environ.setdefault("WANDB_LOG_MODEL", "false")
    return report


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once and kept in tracking.json."""
    path = run_dir / TRACKING_FILE
    known = read_json(path, {}).get("wandb_run_id")
    if known:
        return known
    rid = os.environ.get("LORAFORGE_WANDB_RUN_ID") or uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {"wandb_run_id": rid})
    return rid


class TrackedConfig(TrainerCallback):
    """Add loraforge's resolved recipe, plan, hardware and versions to the tracker's config."""

    def __init__(self, backends: list[str], info: dict):
        self.backends = backends
        self.info = info

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "wandb" in self.backends:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"loraforge": self.info}, allow_val_change=True)
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(os.environ["TENSORBOARD_LOGGING_DIR"]) as w:
                w.add_text("loraforge", "```\n" + json.dumps(self.info, indent=2, default=str) + "\n```")
