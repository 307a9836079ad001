"""`loraforge slurm`: render an sbatch script from the recipe and the plan, submit it, report on it.

Rendering is pure (`compose`, `render_script`): the script for 2 nodes x 8 GPUs is tested on a laptop.
The script fills one of the templates in `slurm/` (single_node.sbatch, multi_node.sbatch):

- one `srun` task per node runs `accelerate launch` with the arguments `loraforge launch` composes
  (`launch.accelerate_args`), except that the node rank, the rendezvous address and port are shell
  variables expanded *on each node* (`$SLURM_NODEID`, `$MAIN_IP`, `$MAIN_PORT`) inside a single-quoted
  `bash -c '...'`; the rendezvous is static (each node states its rank), never c10d + same_network;
- `#SBATCH` lines hold literal values only (SLURM never expands shell variables there);
- `--signal=B:USR1@LEAD` + `--requeue`: the batch shell forwards USR1 to the training processes
  (preemption.py: finish the step, checkpoint, exit 75), then `scontrol requeue`s the job, which resumes.

Files live next to the run directory, in `RUN_DIR.slurm/` (the run directory itself is created by the
training processes): `job.sbatch`, `slurm-<jobid>.out` (appended across requeues), `jobs.jsonl`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.checkpoints import latest_complete
from loraforge.errors import UserError
from loraforge.launch.accelerate import Topology, accelerate_args
from loraforge.launch.preview import plan_launch
from loraforge.plan.planner import plan_batch, recipe_split
from loraforge.plan.strategy import CONFIG_ENV, choose_strategy
from loraforge.resources import shipped_dir
from loraforge.rundir import CHECKPOINTS_DIR, DONE_FILE, METRICS_FILE, PLAN_FILE, PREEMPTED_FILE, RECIPE_FILE, read_json

DEFAULT_SIGNAL_LEAD_S = 300
# Shell words that need no quoting inside the single-quoted `bash -c '...'` (same set as shlex.quote).
_SAFE = re.compile(r"^[\w@%+=:,./-]+$")
# Values allowed on an #SBATCH line: no whitespace, no shell syntax (nothing there is ever expanded).
_SBATCH_VALUE = re.compile(r"^[\w@%+=:,./\[\]|&*()!-]+$")
# What each node substitutes into the accelerate arguments (expanded on the node, not in the batch shell).
NODE_RANK_VAR = '"$SLURM_NODEID"'
MAIN_IP_VAR = '"$MAIN_IP"'
MAIN_PORT_VAR = '"$MAIN_PORT"'


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 1  # with cpu=True: CPU processes per node
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    setup: str | None = None  # the text of a site-setup file (module loads, env activation)
    cpu: bool = False
    signal_lead_s: int = DEFAULT_SIGNAL_LEAD_S
    job_name: str = "loraforge"
    strategy: str = "auto"
    hardware: str | None = None  # profile of the compute nodes' GPUs (see `loraforge plan --hardware`)
    vram: float | None = None  # or their GB per GPU


@dataclass(frozen=True)
class JobFiles:
    dir: Path

    @property
    def script(self) -> Path:
        return self.dir / "job.sbatch"

    @property
    def log_pattern(self) -> Path:
        return self.dir / "slurm-%j.out"

    def log(self, job_id: str) -> Path:
        return self.dir / f"slurm-{job_id}.out"

    @property
    def jobs(self) -> Path:
        return self.dir / "jobs.jsonl"


def job_files(run_dir: Path) -> JobFiles:
    """`RUN_DIR.slurm/`: next to the run directory (which only the training processes create)."""
    run_dir = Path(run_dir)
    return JobFiles(run_dir.with_name(run_dir.name + ".slurm"))


@dataclass(frozen=True)
class Composed:
    args: list[str]  # accelerate launch arguments, node rank / address / port still placeholders
    strategy: str
    why: str
    batch: object  # planner.BatchPlan
    notes: tuple[str, ...] = field(default_factory=tuple)


def compose(recipe, recipe_path: str, opts: SlurmOptions, overrides: list[str] | tuple = ()) -> Composed:
    """The plan's batch split for nodes x processes, and `loraforge launch`'s accelerate arguments."""
    if opts.nodes < 1 or opts.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be at least 1")
    overrides = list(overrides)
    if opts.cpu and "training.device=cpu" not in overrides:
        overrides.append("training.device=cpu")
    topo = Topology(opts.gpus_per_node, opts.nodes, 0, "MAIN_IP" if opts.nodes > 1 else None, 29500)
    notes: list[str] = []
    if opts.cpu or opts.hardware or opts.vram:
        # The same planning as `loraforge launch`: the memory model for the target nodes picks the strategy.
        if opts.cpu:
            recipe = recipe.model_copy(deep=True)
            recipe.training.device = "cpu"
        lp = plan_launch(recipe, opts.strategy, opts.gpus_per_node, opts.nodes,
                         None if opts.cpu else opts.hardware, None if opts.cpu else opts.vram)
        strategy, why, batch = lp.strategy, lp.why, lp.plan.batch
        notes += lp.view.all_notes
    else:
        # Submitting from a login node without the compute nodes' GPUs: split the global batch, and say that
        # memory was not checked here (each node still plans, and refuses a plan that does not fit).
        strategy, why = choose_strategy(opts.strategy, topo.world_size, recipe.quantization.mode)
        batch = plan_batch(recipe.training.global_batch_size, topo.world_size, *recipe_split(recipe.training))
        notes += list(batch.notes) + [
            "memory not checked for the compute nodes: pass --hardware PROFILE or --vram GB to plan with the "
            "memory model (and let it choose the strategy)"
        ]
    args = accelerate_args(strategy, topo, batch.gradient_accumulation_steps, recipe_path, overrides)
    args.append("--quiet")  # no progress bar in the job log (metrics.jsonl and `loraforge slurm status` have it)
    return Composed(node_args(args), strategy, why, batch, tuple(notes))


def node_args(args: list[str]) -> list[str]:
    """Replace the node rank, rendezvous address and port by the variables each node expands."""
    out = list(args)
    for flag, var in (("--machine_rank", NODE_RANK_VAR), ("--main_process_ip", MAIN_IP_VAR),
                      ("--main_process_port", MAIN_PORT_VAR)):
        if flag in out:
            out[out.index(flag) + 1] = var
    return out


def _word(a: str) -> str:
    """One word of the command inside `bash -c '...'`: no single quote may appear there."""
    if a in (NODE_RANK_VAR, MAIN_IP_VAR, MAIN_PORT_VAR) or _SAFE.match(a):
        return a
    if "'" in a:
        raise UserError(f"{a!r}: a single quote cannot go into the sbatch script's srun command; rename it")
    return '"' + re.sub(r'(["\\$`])', r"\\\1", a) + '"'


def node_env(args: list[str], opts: SlurmOptions) -> list[str]:
    """Lines each node runs before `accelerate launch` (inside the single-quoted `bash -c`): OpenMP threads =
    the CPUs srun gave this node's task / processes on the node (at least 1; an OMP_NUM_THREADS exported by the
    setup file wins), and the name of the accelerate config (recorded by the training processes in plan.json)."""
    per = max(1, int(opts.gpus_per_node))
    cpus = '${SLURM_CPUS_PER_TASK:-%d}' % per
    lines = [f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-$(( {cpus} / {per} > 0 ? {cpus} / {per} : 1 ))}}"']
    if "--config_file" in args:

        lines.append(f"export {CONFIG_ENV}={Path(args[args.index('--config_file') + 1]).name}")
    return lines


def node_command(args: list[str]) -> str:
    return "accelerate launch " + " ".join(_word(a) for a in args)


def _check_value(name: str, value) -> str:
    value = str(value)
    if not _SBATCH_VALUE.match(value) or "$" in value:
        raise UserError(f"--{name} {value!r}: not a plain SLURM value (no spaces, no shell variables)")
    return value


def sbatch_lines(opts: SlurmOptions, files: JobFiles, workdir: Path) -> list[str]:
    lines = [("job-name", re.sub(r"[^\w.-]", "-", opts.job_name)[:64] or "loraforge"),
             ("nodes", opts.nodes), ("ntasks-per-node", 1)]
    if not opts.cpu:
        lines.append(("gpus-per-node", opts.gpus_per_node))
    for name in ("cpus_per_task", "time", "partition", "account", "qos", "constraint"):
        value = getattr(opts, name)
        if value is not None and value != "":
            lines.append((name.replace("_", "-"), value))
    for path in (files.log_pattern, workdir):
        if re.search(r"\s|\$|'|\"", str(path)):
            raise UserError(f"{path}: the run directory's path may not hold spaces, quotes or $ (an #SBATCH line)")
    lines += [("chdir", workdir), ("output", files.log_pattern), ("open-mode", "append"),
              ("signal", f"B:USR1@{int(opts.signal_lead_s)}"), ("requeue", None)]
    out = []
    for name, value in lines:
        if value is None:
            out.append(f"#SBATCH --{name}")
        else:
            out.append(f"#SBATCH --{name}={value if name in ('chdir', 'output') else _check_value(name, value)}")
    return out


def render_script(composed: Composed, opts: SlurmOptions, run_dir: Path, files: JobFiles, workdir: Path,
                  recipe_label: str) -> str:
    """The whole sbatch script (pure)."""
    template = (shipped_dir("slurm") / ("multi_node.sbatch" if opts.nodes > 1 else "single_node.sbatch")).read_text()
    # CPU jobs (--cpu) need no accelerate flag: training.device=cpu makes the Trainer's PartialState(cpu=True) use
    # gloo. Never ACCELERATE_USE_CPU=1: AcceleratorState then skips DeepSpeed/FSDP and trains plain DDP, silently.
    env = ["export PYTHONUNBUFFERED=1"]
    setup = opts.setup.rstrip("\n") if opts.setup else "# (none: pass --setup FILE to add module loads / env activation)"
    values = {
        "@SBATCH@": "\n".join(sbatch_lines(opts, files, workdir)),
        "@NODES@": str(opts.nodes),
        "@PER_NODE@": str(opts.gpus_per_node),
        "@UNIT@": "CPU processes" if opts.cpu else "GPUs",
        "@WORLD@": str(opts.nodes * opts.gpus_per_node),
        "@RECIPE@": recipe_label,
        "@LEAD@": str(int(opts.signal_lead_s)),
        "@RUN_DIR@": shlex.quote(str(run_dir)),
        "@SETUP@": setup,
        "@ENV@": "\n".join(env),
        "@NODE_ENV@": "\n".join(node_env(composed.args, opts)),
        "@LAUNCH@": node_command(composed.args),
    }
    for key, value in values.items():
        template = template.replace(key, value)
    return template


# ------------------------------------------------------------------ submit and status (touch SLURM)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise UserError(f"`{tool}` is not on PATH: run this on a SLURM login node (or use --dry-run)")
    return path


def submit(script: Path, files: JobFiles, info: dict) -> str:
    """sbatch the script; record the job in jobs.jsonl; returns the job id."""
    _need("sbatch")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    with open(files.jobs, "a", encoding="utf-8") as f:
        f.write(json.dumps({"job_id": job_id, "submitted": time.time(), "script": str(script), **info}) + "\n")
    return job_id


def recorded_jobs(run_dir: Path) -> list[dict]:
    path = job_files(run_dir).jobs
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def job_state(job_id: str) -> dict:
    """State from squeue (queued/running), else sacct (finished, if accounting is on), else scontrol."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%l|%D|%R"])
    if out:
        state, elapsed, limit, nodes, reason = out.splitlines()[0].split("|", 4)
        return {"state": state, "elapsed": elapsed, "time_limit": limit, "nodes": nodes, "reason": reason,
                "source": "squeue"}
    out = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode,Elapsed,NodeList"])
    if out:
        state, code, elapsed, nodes = (out.splitlines()[0].split("|") + ["", "", "", ""])[:4]
        return {"state": state, "exit_code": code, "elapsed": elapsed, "nodes": nodes, "source": "sacct"}
    out = _run(["scontrol", "show", "job", job_id, "-o"])
    if out:
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return {"state": fields.get("JobState", "?"), "exit_code": fields.get("ExitCode"),
                "elapsed": fields.get("RunTime"), "restarts": fields.get("Restarts"), "source": "scontrol"}
    return {"state": "UNKNOWN (not in squeue; no accounting)", "source": None}


def run_progress(run_dir: Path) -> dict:

    run_dir = Path(run_dir)
    out: dict = {"run_dir": str(run_dir), "finished": (run_dir / DONE_FILE).is_file()}
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        last = None
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                last = rec
        if last:
            out["step"] = last.get("step")
            out["loss"] = last.get("loss")
    recipe = run_dir / RECIPE_FILE
    if recipe.is_file():
        import yaml

        max_steps = (yaml.safe_load(recipe.read_text()).get("training") or {}).get("max_steps", -1)
        if max_steps and max_steps > 0:
            out["max_steps"] = max_steps
    if (run_dir / PLAN_FILE).is_file():
        out["world_size"] = read_json(run_dir / PLAN_FILE, {}).get("world_size")
    ckpt = latest_complete(run_dir / CHECKPOINTS_DIR)
    out["latest_checkpoint"] = str(ckpt) if ckpt else None

    if (run_dir / PREEMPTED_FILE).is_file():
        out["preempted"] = read_json(run_dir / PREEMPTED_FILE, {})
    return out


def status(run_dir: Path) -> dict:
    jobs = recorded_jobs(run_dir)
    out = {"jobs_file": str(job_files(run_dir).jobs), "progress": run_progress(run_dir)}
    if jobs:
        job_id = jobs[-1]["job_id"]
        out["job_id"] = job_id
        out["job"] = job_state(job_id)
        out["log"] = str(job_files(run_dir).log(job_id))
    return out


def workdir_of(recipe_output_dir: str, cwd: Path | None = None) -> tuple[Path, Path]:
    """(working directory of the job, absolute run directory): a relative output_dir resolves from cwd."""
    cwd = Path(cwd or os.getcwd()).resolve()
    run_dir = Path(recipe_output_dir).expanduser()
    return cwd, (run_dir if run_dir.is_absolute() else cwd / run_dir)
