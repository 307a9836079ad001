"""Hardware profiles: plan for a machine you are not on (`--hardware`, `--vram`, `--gpus`, `--nodes`).

The profiles are data (hardware_profiles.yaml next to this file); `hardware_for(...)` turns one into the same
`Hardware` value that detection returns, so the planner cannot tell a profile from a real machine.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import UserError
from loraforge.plan import hardware
from loraforge.plan.hardware import Gpu, Hardware

PROFILES_FILE = Path(__file__).with_name("hardware_profiles.yaml")


def load_profiles() -> dict[str, dict]:
    import yaml

    return yaml.safe_load(PROFILES_FILE.read_text())


def hardware_for(
    profile: str | None = None,
    vram_gib: float | None = None,
    gpus: int | None = None,
    nodes: int = 1,
    strategy: str | None = None,
    detected=None,
):
    """A `Hardware` for a profile name, or a card of `vram_gib`, with `gpus` per node on `nodes` nodes.

    Without a profile or --vram, `detected` (this machine) is the base and only the topology is replaced."""
    if nodes < 1 or (gpus is not None and gpus < 1):
        raise UserError("--gpus and --nodes must be at least 1")
    if profile is None and vram_gib is None:
        if detected is None:
            raise UserError("give --hardware NAME or --vram GB, or plan for this machine")
        base = detected
        per_node = gpus or (len(base.gpus) if base.kind == "cuda" else 1)
        gpu_list = tuple(base.gpus[:1]) * per_node if base.kind == "cuda" else ()
        return Hardware(kind=base.kind, gpus=gpu_list, ram_gib=base.ram_gib, world_size=per_node * nodes,
                        num_nodes=nodes, strategy=strategy, profile=None, notes=base.notes)
    profiles = load_profiles()
    if profile is not None and profile not in profiles:
        raise UserError(f"--hardware {profile}: unknown profile; known: {', '.join(profiles)} (or use --vram GB)")
    spec = dict(profiles[profile]) if profile else {}
    ram = detected.ram_gib if detected is not None else _ram_gib()
    if spec.get("kind") == "cpu":
        per_node = gpus or 1
        return Hardware(kind="cpu", gpus=(), ram_gib=float(vram_gib or ram), world_size=per_node * nodes,
                        num_nodes=nodes, strategy=strategy, profile=profile)
    if vram_gib is not None:
        if vram_gib <= 0:
            raise UserError("--vram must be a positive number of GB")
        name = spec.get("name", "GPU") + (f" ({vram_gib:g} GB)" if profile else f" with {vram_gib:g} GB")
        spec = spec | {"name": name, "total_gib": float(vram_gib), "capability": spec.get("capability", [8, 0])}
    per_node = gpus or int(spec.get("gpus", 1))
    gpu = Gpu(name=spec["name"], total_gib=float(spec["total_gib"]), capability=tuple(spec["capability"]))
    return Hardware(kind="cuda", gpus=(gpu,) * per_node, ram_gib=ram, world_size=per_node * nodes, num_nodes=nodes,
                    strategy=strategy, profile=profile or f"vram-{vram_gib:g}gb")


def _ram_gib() -> float:
    return hardware._ram_gib()
