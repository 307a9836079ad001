"""Every shipped accelerate config has run in this test session, as the distributed type it names.

The training processes record what they were launched with in their run directory's plan.json
(`launch.accelerate_config`: the file the launcher named; `launch.distributed_type`: what accelerate really set up). This
module is collected last (`zz`); it reads every plan.json under pytest's basetemp and fails on a config that
no test launched, or that ran as something else (e.g. ZeRO silently as DDP). It is skipped, saying why, when
only part of the suite ran (a file, -k or -m selection), or when the SLURM tests (multi-node configs) were
skipped because no cluster is up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SESSION

from loraforge.resources import shipped_dir

CONFIGS = sorted(shipped_dir("accelerate_configs").glob("*.yaml"))
# accelerate's distributed type per config; on CPU processes a MULTI_GPU (DDP) config runs as MULTI_CPU (gloo)
ACCEPTED = {"DEEPSPEED": {"DEEPSPEED"}, "FSDP": {"FSDP"}, "MULTI_GPU": {"MULTI_GPU", "MULTI_CPU"}, "NO": {"NO"}}


def _whole_suite() -> str | None:
    """None when the whole suite is running; else why not."""
    every = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    missing = sorted(every - SESSION["modules"])
    if missing:
        return f"only part of the suite ran (not collected: {', '.join(missing)})"
    if SESSION["deselected"]:
        return f"only part of the suite ran ({SESSION['deselected']} tests deselected by -k/-m)"
    return None


def not_run(records: list[dict], configs=CONFIGS) -> list[str]:
    """One line per config that no record shows running as the distributed type it names."""
    ran: dict[str, set[str]] = {}
    for rec in records:
        if rec.get("accelerate_config"):
            ran.setdefault(rec["accelerate_config"], set()).add(rec.get("distributed_type"))
    problems = []
    for cfg in configs:
        want = yaml.safe_load(cfg.read_text())["distributed_type"]
        got = ran.get(cfg.name)
        if not got:
            problems.append(f"{cfg.name}: no test launched it")
        elif not got & ACCEPTED[want]:
            problems.append(f"{cfg.name}: launched, but ran as {', '.join(sorted(got))}, not {want}")
    return problems


def test_the_check_itself():
    every = [{"accelerate_config": c.name, "distributed_type": yaml.safe_load(c.read_text())["distributed_type"]}
             for c in CONFIGS]
    assert not_run(every) == []
    ddp_cpu = [r | {"distributed_type": "MULTI_CPU"} if r["distributed_type"] == "MULTI_GPU" else r for r in every]
    assert not_run(ddp_cpu) == []  # DDP over gloo is DDP
    silent = [r | {"distributed_type": "MULTI_CPU"} if r["accelerate_config"] == "zero2.yaml" else r for r in every]
    assert not_run(silent) == ["zero2.yaml: launched, but ran as MULTI_CPU, not DEEPSPEED"]
    assert not_run([r for r in every if r["accelerate_config"] != "fsdp.yaml"]) == ["fsdp.yaml: no test launched it"]


def test_every_shipped_accelerate_config_ran(tmp_path_factory):
    why = _whole_suite()
    if why:
        pytest.skip(f"{why}: the runs of every accelerate config cannot all have happened")
    records = []
    for path in tmp_path_factory.getbasetemp().rglob("plan.json"):
        try:
            records.append(json.loads(path.read_text()).get("launch") or {})
        except ValueError:
            continue
    problems = not_run(records)
    if not problems:
        return
    slurm_skipped = [n for n, r in SESSION["skipped"].items() if "test_slurm.py" in n and "SLURM" in r]
    if slurm_skipped and all("multinode" in p.split(":")[0] for p in problems):
        pytest.skip(f"the SLURM tests were skipped ({SESSION['skipped'][slurm_skipped[0]]}); not run: "
                    + "; ".join(problems))
    pytest.fail("accelerate configs this suite never ran as what they name:\n  " + "\n  ".join(problems))
