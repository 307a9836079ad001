"""Find the shipped recipes / accelerate configs / sbatch templates, from a source checkout or a wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_KINDS = ("recipes", "accelerate_configs", "slurm", "launch")


def shipped_dir(kind: str) -> Path:
    """Directory holding the shipped files of `kind` (one of recipes, accelerate_configs, slurm, launch)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown resource kind {kind!r}")
    packaged = Path(str(resources.files("loraforge"))) / "_data" / kind
    if packaged.is_dir():  # installed from a wheel
        return packaged
    checkout = Path(__file__).resolve().parents[2] / kind  # src/loraforge/../../<kind> in a checkout
    return checkout


def find_recipe(name_or_path: str) -> Path:
    """A recipe path as given, or the name of a shipped recipe (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (shipped_dir("recipes") / name_or_path, shipped_dir("recipes") / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # the loader reports it as missing, naming the path the user gave
