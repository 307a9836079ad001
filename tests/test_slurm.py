"""SLURM: the rendered sbatch script is right for clusters we are not on (2 nodes x 8 GPUs), and on the real
local cluster (../shared/slurm/start-slurm.sh, NODES=2 FAKE_GPUS=8) a 2-node CPU job forms one process group
across both nodes and trains the 1-process adapter; USR1 -> checkpoint -> requeue -> resume gives the same
adapter as an uninterrupted run; a --gpus-per-node=8 job is scheduled with CUDA_VISIBLE_DEVICES=0..7."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl
from safetensors.torch import load_file

STUB_ACCELERATE = """#!/usr/bin/env python3
import json, os, sys
out = os.environ["LF_STUB_OUT"]
with open(os.path.join(out, "node-%s.json" % os.environ["SLURM_NODEID"]), "w") as f:
    json.dump({"argv": sys.argv[2:], "command": sys.argv[1], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "node": os.environ.get("SLURMD_NODENAME"), "main_ip": os.environ.get("MAIN_IP")}, f)
"""

# Makes every optimizer step slower (only where this directory is on PYTHONPATH), so USR1 lands mid-run: the
# SFT trainer's and the preference (DPO / ORPO) trainer's.
SLOW_STEPS = """import os
if os.environ.get("LORAFORGE_TEST_STEP_SLEEP"):
    import time
    from loraforge.run import session as _s
    _libraries = _s.training_libraries
    def _slow(trainer_cls):
        class Slow(trainer_cls):
            def training_step(self, *a, **k):
                time.sleep(float(os.environ["LORAFORGE_TEST_STEP_SLEEP"]))
                return super().training_step(*a, **k)
        return Slow
    def _training_libraries():  # the trainer (heavy: trl) loads where loraforge loads it
        libs = _libraries()
        libs.trainer.LoraTrainer = _slow(libs.trainer.LoraTrainer)
        libs.preference.PreferenceTrainer = _slow(libs.preference.PreferenceTrainer)
        return libs
    _s.training_libraries = _training_libraries
"""


def _recipe(tmp: Path, model_dir: Path, name: str, **training) -> Path:
    """An SFT recipe on 48 chats; with training.method dpo, on test_preference's 16 pairs."""
    if training.get("method") == "dpo":
        from test_preference import pair_records

        data, records = tmp / "pairs.jsonl", pair_records()
    else:
        data, records = tmp / "train.jsonl", chat_records(48)
    if not data.exists():
        write_jsonl(data, records)
    d = recipe_dict(model_dir, data, tmp / "runs" / name, training={
        "max_steps": 12, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 1e-2,
        "lr_scheduler": "cosine", "warmup": 1, "save_steps": 6, "save_total_limit": 2, **training,
    })
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _cli(*args, env=None, cwd=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    # sbatch hands this environment to the job: the interpreter running the tests comes first on PATH, so the
    # job's `accelerate` (and the python it starts) are this checkout's, not another install's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent), "PATH": path} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _dry_run(recipe: Path, *extra) -> str:
    from typer.testing import CliRunner

    from loraforge.cli import app

    r = CliRunner().invoke(app, ["slurm", "submit", str(recipe), *extra, "--dry-run"])
    assert r.exit_code == 0, r.output
    return r.stdout


def _srun_body(script: str) -> str:
    """What each node runs: the single-quoted argument of `srun ... bash -c '...'`."""
    m = re.search(r"^srun [^\n']*bash -c '([^']*)' &$", script, re.M)
    assert m, "no `srun ... bash -c '...' &` line"
    return m.group(1)


def _on_node(body: str, tmp: Path, **env) -> list[str]:
    """Run one node's command with `accelerate` replaced by a function that prints its arguments."""
    prog = 'accelerate() { printf "%s\\0" "$@" > "$LF_ARGS"; }\n' + body.replace("exec accelerate", "accelerate")
    out = tmp / "args.bin"
    subprocess.run(["bash", "-c", prog], check=True, capture_output=True, text=True,
                   env={"PATH": os.environ["PATH"], "LF_ARGS": str(out), **env})
    argv = out.read_bytes().decode().split("\0")[:-1]
    assert argv[0] == "launch"
    return argv[1:]


# ------------------------------------------------------------------ rendering (no cluster needed)


def test_2_nodes_x_8_gpus_script(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "big", global_batch_size=32, micro_batch_size=2)
    setup = tmp_path / "site.sh"
    setup.write_text("module load cuda/12.4\nsource /opt/venvs/loraforge/bin/activate\n")
    script = _dry_run(recipe, "--nodes", "2", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu",
                      "--account", "proj42", "--qos", "high", "--constraint", "a100-80g", "--setup", str(setup),
                      "--signal-lead", "600", "--set", "training.learning_rate=1e-4")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    lines = script.splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(lines.index(line) < first_command for line in sbatch)  # SLURM reads #SBATCH only before commands
    for line in sbatch:  # SLURM expands no shell variable there: none may appear
        assert "$" not in line and "`" not in line and "{" not in line, line
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu",
                 "--account=proj42", "--qos=high", "--constraint=a100-80g", "--signal=B:USR1@600", "--requeue",
                 "--open-mode=append"):
        assert f"#SBATCH {want}" in sbatch, want
    assert "module load cuda/12.4" in script and "trap forward_usr1 USR1" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script

    body = _srun_body(script)
    assert '--machine_rank "$SLURM_NODEID"' in body  # single-quoted: expanded on each node, not in the batch shell
    assert "--same_network" not in script and "c10d" not in body and "--rdzv_backend static" in body
    for rank in (0, 1):
        args = _on_node(body, tmp_path, SLURM_NODEID=str(rank), MAIN_IP="10.0.0.1", MAIN_PORT="21234")
        from accelerate.commands.launch import launch_command_parser

        parsed = launch_command_parser().parse_args(args)
        assert parsed.machine_rank == rank and parsed.num_machines == 2 and parsed.num_processes == 16
        assert parsed.main_process_ip == "10.0.0.1" and parsed.main_process_port == 21234
        assert parsed.rdzv_backend == "static" and not parsed.same_network
        assert parsed.gradient_accumulation_steps == 1  # global 32 = micro 2 x accumulation 1 x 16 processes
        # the very command `loraforge launch` composes for that node
        launch = _cli("launch", str(recipe), "--nodes", "2", "--gpus", "8", "--node-rank", str(rank), "--main-ip",
                      "10.0.0.1", "--main-port", "21234", "--strategy", "ddp", "--set", "training.learning_rate=1e-4",
                      "--dry-run").stdout.strip()
        import shlex

        assert shlex.split(launch)[2:] + ["--quiet"] == args


def test_single_node_script_and_accumulation(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "one-node", global_batch_size=32, micro_batch_size=2)
    script = _dry_run(recipe, "--gpus-per-node", "4")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=1" in sbatch and "#SBATCH --gpus-per-node=4" in sbatch
    assert not any(k in line for line in sbatch for k in ("--partition", "--account", "--qos", "--time="))  # only if asked
    body = _srun_body(script)
    assert "SLURM_NODEID\" " not in body.split("exec", 1)[1] and "--machine_rank" not in body
    args = _on_node(body, tmp_path, MAIN_PORT="20007")
    assert args[args.index("--num_processes") + 1] == "4" and args[args.index("--main_process_port") + 1] == "20007"
    assert args[args.index("--gradient_accumulation_steps") + 1] == "4"  # 32 = 2 x 4 x 4
    written = tmp_path / "runs" / "one-node.slurm" / "job.sbatch"
    assert written.read_text() == script  # written next to the run directory, not in it


def test_bad_sbatch_values_are_refused(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from loraforge.cli import app

    recipe = _recipe(tmp_path, tiny_model_dir, "bad")
    r = CliRunner().invoke(app, ["slurm", "submit", str(recipe), "--partition", "$PARTITION", "--dry-run"])
    assert r.exit_code == 2 and "no shell variables" in r.output


def test_signal_stops_after_the_step_on_every_rank():
    from types import SimpleNamespace

    from transformers import TrainerControl

    from loraforge.run.preemption import StopOnSignal

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopOnSignal()
    try:
        args, control = SimpleNamespace(device="cpu"), TrainerControl()
        stop.on_step_end(args, SimpleNamespace(global_step=2, max_steps=10), control)
        assert not control.should_training_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.requested == "SIGUSR1"
        stop.on_step_end(args, SimpleNamespace(global_step=3, max_steps=10), control)
        assert control.should_save and control.should_training_stop and stop.stopped_at == 3
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


# ------------------------------------------------------------------ the real local cluster


def _cluster_nodes() -> list[tuple[str, str, str]]:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        pytest.skip("SLURM is not installed here (no sbatch): start ../shared/slurm/start-slurm.sh as root")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo does not answer: the SLURM cluster is not up")
    if out.returncode != 0:
        pytest.skip(f"the SLURM cluster is not up: {out.stderr.strip()[:200]}")
    nodes = [tuple(line.split()) for line in out.stdout.splitlines() if len(line.split()) == 3]
    return [n for n in nodes if n[1].rstrip("*") in ("idle", "mixed", "allocated", "completing")]


@pytest.fixture(scope="module")
def cluster():
    nodes = _cluster_nodes()
    if len(nodes) < 2:
        pytest.skip(f"needs a SLURM cluster of 2 nodes (NODES=2 start-slurm.sh); up: {nodes}")
    return nodes


def _job_id(run_dir: Path) -> str:
    jobs = (run_dir.with_name(run_dir.name + ".slurm") / "jobs.jsonl").read_text().splitlines()
    return json.loads(jobs[-1])["job_id"]


def _squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _wait_gone(job: str, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while _squeue_state(job):
        if time.time() > end:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still in the queue after {timeout:.0f} s")
        time.sleep(0.5)
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log(run_dir: Path, job: str) -> str:
    return (run_dir.with_name(run_dir.name + ".slurm") / f"slurm-{job}.out").read_text(errors="replace")


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, cluster):
    """The 1-process reference run: 12 optimizer steps at global batch 8."""
    tmp = tmp_path_factory.mktemp("slurm")
    _cli("train", str(_recipe(tmp, tiny_model_dir, "one")), "--quiet")
    return tmp


@pytest.fixture(scope="module")
def runs(reference, tiny_model_dir):
    """The 2-node DDP job (over SLURM), 12 optimizer steps at global batch 8 like the reference."""
    tmp = reference
    recipe = _recipe(tmp, tiny_model_dir, "two-nodes")
    out = _cli("slurm", "submit", str(recipe), "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--time", "00:10:00")
    run_dir = tmp / "runs" / "two-nodes"
    job = _job_id(run_dir)
    assert f"submitted job {job}" in out.stdout and f"slurm-{job}.out" in out.stdout
    info = _wait_gone(job)
    return tmp, job, info


@pytest.mark.slow
def test_two_node_job_forms_one_group_and_trains_the_one_process_adapter(runs):
    tmp, job, info = runs
    run_dir = tmp / "runs" / "two-nodes"
    log = _log(run_dir, job)
    assert info.get("JobState") == "COMPLETED", log[-3000:]
    ranks = dict((int(r), node) for _, node, r in re.findall(r"node (\d+) \((\S+)\): machine_rank (\d+)", log))
    assert sorted(ranks) == [0, 1] and len(set(ranks.values())) == 2, log[:2000]  # one task per node, own rank
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["hardware"]["num_nodes"] == 2  # one group across both nodes
    one = json.loads((tmp / "runs" / "one" / "plan.json").read_text())
    assert one["world_size"] == 1 and one["global_batch_size"] == plan["global_batch_size"] == 8
    assert plan["gradient_accumulation_steps"] * 2 == one["gradient_accumulation_steps"]
    assert _max_diff(tmp / "runs" / "one", run_dir) <= 1e-5
    status = _cli("slurm", "status", str(run_dir)).stdout
    assert f"job {job}: COMPLETED" in status and "step 12 of 12" in status and "world size 2" in status


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3-offload", "fsdp"])
def test_two_node_zero_and_fsdp_jobs_form_one_world_and_train_the_one_process_adapter(reference, tiny_model_dir, strategy):
    """Multi-node DeepSpeed (and FSDP2) for real: `accelerate launch --deepspeed_multinode_launcher standard` on each of 2
    SLURM nodes (torchrun with the node's rank); without it accelerate runs `deepspeed --hostfile None --launcher
    pdsh`, which starts a separate local job per node. One world of 2 under DeepSpeed (plan.json's `launch` is what the
    training processes' accelerator really set up: plan.json's `launch`), and the 1-process adapter."""
    tmp = reference
    name = f"two-nodes-{strategy}"
    recipe = _recipe(tmp, tiny_model_dir, name)
    # fsdp: accelerate's FSDP2 path on CPU processes through the test harness (tests/harness/sitecustomize.py)
    env = {"PYTHONPATH": f"{Path(__file__).parent / 'harness'}{os.pathsep}{Path(__file__).parent}",
           "LORAFORGE_TEST_CPU_FSDP": "1"} if strategy == "fsdp" else None
    _cli("slurm", "submit", str(recipe), "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--strategy", strategy,
         "--time", "00:10:00", env=env)
    run_dir = tmp / "runs" / name
    job = _job_id(run_dir)
    info = _wait_gone(job, 600)
    log = _log(run_dir, job)
    assert info.get("JobState") == "COMPLETED", log[-4000:]
    ranks = dict((int(r), node) for _, node, r in re.findall(r"node (\d+) \((\S+)\): machine_rank (\d+)", log))
    assert sorted(ranks) == [0, 1] and len(set(ranks.values())) == 2, log[:2000]
    launched = json.loads((run_dir / "plan.json").read_text())["launch"]
    config = {"zero2": "zero2", "zero3": "zero3", "zero3-offload": "zero3_offload", "fsdp": "fsdp"}[strategy]
    assert launched["accelerate_config"] == f"{config}_multinode.yaml"
    if strategy == "fsdp":
        assert launched["distributed_type"] == "FSDP" and launched["zero_stage"] is None
    else:
        assert launched["distributed_type"] == "DEEPSPEED" and launched["zero_stage"] == (2 if strategy == "zero2" else 3)
        assert (launched["offload_optimizer"] == "cpu") == (strategy == "zero3-offload")
    assert launched["world_size"] == 2 and launched["num_nodes"] == 2  # ONE world across both nodes
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["strategy"] == strategy and plan["gradient_accumulation_steps"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps[-1] == 12 and steps == sorted(set(steps))  # one job's metrics, not two jobs writing one file
    assert _max_diff(tmp / "runs" / "one", run_dir) <= 1e-5


def _preempted_job(tmp: Path, recipe: Path, name: str) -> Path:
    """Submit `recipe` (12 steps) as a 2-node CPU job with slowed steps; once step 3 is logged, USR1 to the batch
    shell (as SLURM preemption does, `--signal=B:USR1@lead`): the job must checkpoint after the step, requeue itself,
    resume from that checkpoint and log every step once. Its run directory."""
    slow = tmp / "slow-steps"
    slow.mkdir(exist_ok=True)
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {"PYTHONPATH": f"{slow}{os.pathsep}{Path(__file__).parent}", "LORAFORGE_TEST_STEP_SLEEP": "0.25"}
    _cli("slurm", "submit", str(recipe), "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--time", "00:10:00", env=env)
    run_dir = tmp / "runs" / name
    job = _job_id(run_dir)
    metrics, end = run_dir / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):  # mid-run: step 3 of 12 logged
        assert _squeue_state(job) and time.time() < end, "the job ended or never reached step 3"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = _wait_gone(job)
    log = _log(run_dir, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", log[-3000:]
    m = re.search(r"preempted after step (\d+) of 12; checkpoint (\S+);", log)
    assert m, log[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < 12 and m.group(2).endswith(f"checkpoint-{stopped}")
    assert "requeueing job" in log and f"resuming from {m.group(2)}" in log
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # resumed after the checkpoint, no step twice
    return run_dir


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_adapter(runs, tiny_model_dir):
    tmp = runs[0]
    run_dir = _preempted_job(tmp, _recipe(tmp, tiny_model_dir, "preempted"), "preempted")
    assert _max_diff(tmp / "runs" / "two-nodes", run_dir) <= 1e-6  # as if never interrupted
    assert _max_diff(tmp / "runs" / "one", run_dir) <= 1e-5


@pytest.mark.slow
def test_usr1_preempted_dpo_job_requeues_and_resumes_to_the_same_adapter(cluster, tmp_path, tiny_model_dir):
    """The same for a DPO run (loraforge's preference trainer): preempted, requeued, resumed, it ends with the
    adapter of an uninterrupted 1-process DPO run."""
    kw = dict(method="dpo", learning_rate=5e-3)
    _cli("train", str(_recipe(tmp_path, tiny_model_dir, "dpo-one", **kw)), "--quiet")
    run_dir = _preempted_job(tmp_path, _recipe(tmp_path, tiny_model_dir, "dpo-preempted", **kw), "dpo-preempted")
    assert _max_diff(tmp_path / "runs" / "dpo-one", run_dir) <= 1e-5
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["preference"]["method"] == "dpo" and summary["steps"] == 12


@pytest.mark.slow
def test_fake_8_gpu_job_is_scheduled_with_cuda_visible_devices(cluster, tmp_path, tiny_model_dir):
    if not all(node[2].startswith("gpu:8") for node in cluster):
        pytest.skip(f"needs FAKE_GPUS=8 on each node (start-slurm.sh); gres: {[n[2] for n in cluster]}")
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "accelerate").write_text(STUB_ACCELERATE)
    (stub / "accelerate").chmod(0o755)
    out = tmp_path / "seen"
    out.mkdir()
    setup = tmp_path / "site.sh"  # the site-setup hook: here it swaps accelerate for a stub (no GPU to train on)
    setup.write_text(f"export PATH={stub}:$PATH\nexport LF_STUB_OUT={out}\n")
    recipe = _recipe(tmp_path, tiny_model_dir, "gpus")
    _cli("slurm", "submit", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--time", "00:05:00",
         "--setup", str(setup))
    run_dir = tmp_path / "runs" / "gpus"
    job = _job_id(run_dir)
    info = _wait_gone(job, 120)
    assert info.get("JobState") == "COMPLETED", _log(run_dir, job)[-3000:]
    assert "gpu:8" in info.get("TresPerNode", ""), info
    from accelerate.commands.launch import launch_command_parser

    nodes = [json.loads((out / f"node-{rank}.json").read_text()) for rank in (0, 1)]
    assert len({n["node"] for n in nodes}) == 2
    for rank, seen in enumerate(nodes):
        assert seen["cuda"] == "0,1,2,3,4,5,6,7" and seen["command"] == "launch"
        parsed = launch_command_parser().parse_args(seen["argv"])
        assert parsed.machine_rank == rank and parsed.num_machines == 2 and parsed.num_processes == 16
        assert parsed.multi_gpu and parsed.rdzv_backend == "static"
        assert parsed.main_process_ip == seen["main_ip"] == "127.0.0.1"  # n1's NodeAddr, not a name
        assert parsed.main_process_port == 20000 + int(job) % 20000
