"""The run directory: every file name in it, defined once, and the one reader and atomic writer of its JSON.

    <output_dir>/
      recipe.yaml  source.json  plan.json  versions.json     written when data, plan and model are valid
      metrics.jsonl  memory.json  tracking.json               during training
      checkpoints/checkpoint-N/                               resumable state (checkpoints.py)
      adapter_model.safetensors  adapter_config.json  tokenizer files  checksums.json
      train_summary.json                                      last: the run is finished
      samples.json  eval.json  README.md  plots/*.png         what the run is used for
      preempted.json  .loraforge.lock                         a preemption's marker; the writer's lock
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from loraforge.errors import UserError
from loraforge.redact import redact

RECIPE_FILE = "recipe.yaml"
SOURCE_FILE = "source.json"
PLAN_FILE = "plan.json"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.jsonl"
MEMORY_FILE = "memory.json"
TRACKING_FILE = "tracking.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "checksums.json"
DONE_FILE = "train_summary.json"
SAMPLES_FILE = "samples.json"
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"
PLOTS_DIR = "plots"
PREEMPTED_FILE = "preempted.json"
LOCK_FILE = ".loraforge.lock"


def write_json(path: Path, obj) -> None:
    """Atomically (a reader never sees half a file), with any secret value masked."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(redact(json.dumps(obj, indent=2, default=str)) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default=None, kind: type = dict):
    """The JSON value in `path` (an object, or with kind=list an array: samples.json); `default` when the file is
    missing, unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return data if isinstance(data, kind) else default


def update_json(path: Path, changes: dict) -> None:
    """Merge `changes` into the JSON object in `path` (plan.json grows as the run learns what really ran)."""
    write_json(path, (read_json(path, {}) or {}) | changes)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def prepare_run_dir(recipe, overwrite: bool, is_main: bool) -> tuple[Path, bool]:
    """The run directory's path and whether it already holds this recipe's finished run. A different recipe in
    a used directory stops; --overwrite empties it (all but the run lock this process holds)."""
    run_dir = Path(recipe.output_dir).expanduser()
    existing = run_dir / RECIPE_FILE
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if overwrite:
            if is_main:
                for p in run_dir.iterdir():
                    if p.name != LOCK_FILE:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif existing.is_file():
            if yaml.safe_load(existing.read_text()) != recipe.to_dict():
                raise UserError(
                    f"{run_dir}: holds a run of a different recipe; use --overwrite to replace it, "
                    "or set output_dir to a new directory"
                )
        else:
            raise UserError(f"{run_dir}: exists and is not a loraforge run; use --overwrite or a new output_dir")
    done = (run_dir / DONE_FILE).is_file() and not overwrite
    return run_dir, done
