"""The `loraforge` command: parse, call one function, print. User errors exit 2 with one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import psutil
import typer
from rich.console import Console
from rich.table import Table

from loraforge.console import err_console, quiet_libraries, run_guarded
from loraforge.errors import UserError
from loraforge.launch import preview as planview
from loraforge.launch import slurm
from loraforge.launch.accelerate import Topology, accelerate_args, cpu_threads, render_command, run_accelerate
from loraforge.launch.preview import plan_launch
from loraforge.plan.hardware import detect
from loraforge.recipe import dump_recipe, load_recipe
from loraforge.resources import find_recipe, shipped_dir
from loraforge.run.gpu_check import main as check_main
from loraforge.run.session import run
from loraforge.run.status import format_stages
from loraforge.rundir import PLOTS_DIR, RECIPE_FILE
from loraforge.use.card import write_model_card
from loraforge.use.evaluate import evaluate_run
from loraforge.use.export import export_gguf
from loraforge.use.infer import answer, load_for_inference
from loraforge.use.infer import generate as gen
from loraforge.use.infer import merge as do_merge
from loraforge.use.report import PLOT_FILES
from loraforge.versions import library_versions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal LMs with LoRA/QLoRA; one recipe from a laptop CPU to a SLURM cluster.",
)
console = Console()

SET_HELP = "Override a recipe field, e.g. --set training.learning_rate=1e-4 (repeatable)."


def _exit(fn: Callable[[], object]) -> None:
    code = run_guarded(fn)
    if code:
        raise typer.Exit(code)


def _load(recipe: str, overrides: list[str]):
    return load_recipe(find_recipe(recipe), overrides)


def format_report(report: dict) -> str:
    """A preference run's before -> after scores (preference.json), on one line."""
    b, a = report["before"], report["after"]
    text = (f"chosen preferred {100 * b['chosen_preferred']:.0f}% -> {100 * a['chosen_preferred']:.0f}%, "
            f"log-prob margin {b['mean_logp_margin']:+.3f} -> {a['mean_logp_margin']:+.3f} per token")
    if "reward_margin" in a:
        text += f"; reward accuracy {100 * a['reward_accuracy']:.0f}%, margin {a['reward_margin']:+.3f}"
    return text + f" ({report['pairs']} {report['scored_on']})"


def _print_result(result) -> None:
    table = Table(title="loraforge run", show_header=False)
    table.add_row("run directory", str(result.run_dir))
    table.add_row("optimizer steps", str(result.steps))
    if result.train_loss is not None:
        table.add_row("train loss (mean)", f"{result.train_loss:.4f}")
    if result.eval_loss is not None:
        table.add_row("eval loss", f"{result.eval_loss:.4f}")
    if result.wall_s:
        table.add_row("wall time", f"{result.wall_s:.0f} s")
    if result.tokens_per_second:
        table.add_row("throughput", f"{result.tokens_per_second:,.0f} real tokens/s ({result.tokens_seen:,} tokens)")
    if result.peak_memory_gib is not None:
        what = "GPU allocated" if result.memory_measured == "cuda_allocated" else "process RSS"
        predicted = (f" (predicted {result.predicted_peak_gib:.2f} GiB)"
                     if result.predicted_peak_gib and result.memory_measured == "cuda_allocated" else "")
        table.add_row("peak memory", f"{result.peak_memory_gib:.2f} GiB {what}{predicted}")
    if result.mfu is not None:
        table.add_row("MFU", f"{100 * result.mfu:.1f}% ({result.flops_per_token / 1e9:.2f} GFLOP per token; "
                             f"peak {result.peak_flops / 1e12:.2f} TFLOP/s, {result.peak_source})")
    elif result.peak_source and "uncertain" in result.peak_source:
        table.add_row("MFU", f"not reported: peak {result.peak_flops / 1e12:.2f} TFLOP/s, {result.peak_source}")
    if getattr(result, "startup_s", None):
        stages = getattr(result, "startup_stages", None)
        detail = f" ({format_stages(stages)} s)" if stages else ""
        table.add_row("start-up", f"{result.startup_s:.1f} s from the command to the first optimizer step{detail}")
    if result.trainable_params:
        table.add_row("trainable params", f"{result.trainable_params:,} of {result.total_params:,}")
    table.add_row("adapter", str(result.run_dir / "adapter_model.safetensors"))
    if getattr(result, "preference", None):  # DPO / ORPO: before -> after (preference.py)

        table.add_row(f"preference ({result.preference['method']})", format_report(result.preference))
    if not result.trained:
        table.add_row("note", "already trained; use --overwrite to train again")
    console.print(table)
    if result.samples:
        samples = Table(title="base vs fine-tuned, on prompts not in the training data", show_lines=True)
        samples.add_column("prompt", style="bold")
        samples.add_column("base model")
        start = {r["prompt"]: r["start"] for r in (getattr(result, "preference", None) or {}).get("start_answers", [])}
        if start:
            samples.add_column("start (adapter_from)")
        samples.add_column("fine-tuned", style="green")
        for row in result.samples:
            samples.add_row(row["prompt"], row["base"], *([start.get(row["prompt"], "")] if start else []),
                            row["fine_tuned"])
        console.print(samples)
    d = result.run_dir
    console.print(
        f"next:\n  loraforge chat {d}\n  loraforge generate {d} --prompt '...'\n"
        f"  loraforge merge {d} --out {d}/merged\n  loraforge export {d} --gguf --out {d}/model.gguf\n"
        f"  loraforge eval {d}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe (e.g. quickstart)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace what the run directory holds."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Train RECIPE in this process (for several processes use `loraforge launch` or `accelerate launch`)."""
    quiet_libraries()

    def go():
        _print_result(run(_load(recipe, set_), overwrite=overwrite, quiet=quiet or not sys.stderr.isatty()))

    _exit(go)


@app.command()
def quickstart(
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Train again even if the quickstart run exists."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """The embedded demo: teach SmolLM2-135M-Instruct a made-up identity, offline, then compare answers."""
    train(recipe="quickstart", set_=set_, overwrite=overwrite, quiet=quiet)


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe file or shipped recipe name."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    hardware: Optional[str] = typer.Option(
        None, "--hardware", help="Plan for a profile instead of this machine: rtx3060-12gb, rtx4090-24gb, a100-40gb, "
        "a100-80gb, h100-80gb, cpu (src/loraforge/plan/hardware_profiles.yaml)."),
    vram: Optional[float] = typer.Option(None, "--vram", help="GB of memory per GPU (any other card)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs (processes) per node."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Number of nodes."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="ddp | fsdp | zero2 | zero3 | zero3-offload (default: DDP, or as launched)."),
    trace: bool = typer.Option(False, "--trace", help="Also trace one real step under FakeTensorMode (no GPU) and compare."),
):
    """Show what a run would do: the plan for this machine (or --hardware), its memory, and the resolved recipe."""

    def go():
        r = _load(recipe, set_)
        if planview.config_only_dir(r) is None or (hardware is None and vram is None):
            quiet_libraries()  # imports transformers and datasets: not needed to plan from a config.json alone
        hw = planview.hardware(r, hardware, vram, gpus, nodes, strategy)
        out = planview.build(r, hw, trace=trace).to_dict()
        if as_json:
            print(json.dumps(out | {"recipe": r.to_dict()}, indent=2, default=str))
            return
        planview.render(out, f"plan for {recipe}", console)
        console.print(f"trust_remote_code: {r.model.trust_remote_code}", highlight=False)
        console.print("[bold]resolved recipe[/] (every default shown):")
        console.print(dump_recipe(r), highlight=False)

    _exit(go)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@app.command()
def launch(
    recipe: str = typer.Argument(..., help="Recipe file or shipped recipe name."),
    strategy: str = typer.Option("auto", help="auto | single | ddp | fsdp | zero2 | zero3 | zero3-offload"),
    gpus: Optional[int] = typer.Option(
        None, help="Processes per node (one per GPU). Default: the GPUs here; on a CPU-only machine 1, or 2 when "
        "--strategy asks for several processes (CPU processes over gloo)."),
    nodes: int = typer.Option(1, min=1, help="Number of nodes (machines)."),
    node_rank: int = typer.Option(0, min=0, help="This node's rank, 0..nodes-1."),
    main_ip: Optional[str] = typer.Option(None, help="Address of node 0 (needed with --nodes > 1)."),
    main_port: Optional[int] = typer.Option(None, help="Rendezvous port (default 29500 on several nodes, a free one on one)."),
    hardware: Optional[str] = typer.Option(
        None, "--hardware", help="Plan for a hardware profile instead of this machine (see `loraforge plan --help`)."),
    vram: Optional[float] = typer.Option(None, "--vram", help="GB of memory per GPU of the target machine."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the exact `accelerate launch` command; run nothing."),
):
    """Start RECIPE on one or many processes/nodes through `accelerate launch` (strategy from the plan)."""
    quiet_libraries()

    def go():
        r = _load(recipe, set_)
        per_node = _processes_per_node(r, strategy, gpus, hardware, vram)
        lp = plan_launch(r, strategy, per_node, nodes, hardware, vram)
        port = main_port or (29500 if nodes > 1 else _free_port())
        topo = Topology(lp.hw.world_size // nodes, nodes, node_rank, main_ip, port)
        recipe_path = str(_recipe_path(recipe))
        threads = cpu_threads(topo.processes_per_node, nodes, hardware is None and vram is None, os.environ,
                              psutil.cpu_count(logical=False))
        args = accelerate_args(lp.strategy, topo, lp.plan.batch.gradient_accumulation_steps, recipe_path, set_,
                               threads)
        _print_launch(lp, topo)
        if dry_run:
            print(render_command(args))
            return
        _run_processes(args)

    _exit(go)


def _processes_per_node(r, strategy: str, gpus: int | None, hardware: str | None, vram: float | None) -> int | None:
    """--gpus, else the GPUs here (None: the plan decides, for a profile or --vram); on a CPU-only machine 1, or 2
    when the strategy asks for several processes."""
    # No CUDA context in this process (it stays alive for the whole run): GPUs are counted through NVML.
    here = None if hardware is not None or vram is not None else detect(
        force_cpu=r.training.device == "cpu", free_memory=True)
    on_gpu = (hardware not in (None, "cpu") or vram is not None) or (here is not None and here.kind == "cuda")
    return gpus or (
        len(here.gpus) if on_gpu and here is not None
        else None if on_gpu else (2 if strategy not in ("auto", "single") else 1))


def _print_launch(lp, topo: Topology) -> None:
    """One line: the strategy and why, the topology, the batch split and the predicted memory; then the notes."""
    b, plan = lp.plan.batch, lp.plan
    predicted = plan.memory_dict()["predicted_peak_gib"]
    err_console.print(
        f"[loraforge] strategy {lp.strategy} ({lp.why}); {topo.nodes} node(s) x {topo.processes_per_node} process(es); "
        f"micro-batch {b.micro_batch_size} x accumulation {b.gradient_accumulation_steps} x "
        f"{topo.world_size} = global batch {b.global_batch_size}"
        + (f"; predicted {predicted:.1f} of {plan.budget_gib:.1f} GiB per device"
           if predicted and plan.budget_gib else ""),
        highlight=False, soft_wrap=True)
    for note in lp.view.all_notes:
        err_console.print(f"[loraforge] note: {note}", highlight=False, soft_wrap=True)


def _run_processes(args: list[str]) -> None:
    """`accelerate launch` with `args`; a failed training process becomes a UserError with its exit code."""
    import subprocess

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run_accelerate(args)
    except (subprocess.CalledProcessError, ChildFailedError) as e:
        # DDP/ZeRO/FSDP ranks run under torchrun in this process: a failed rank arrives as ChildFailedError
        code = e.returncode if isinstance(e, subprocess.CalledProcessError) else _child_exit_code(e)
        failed = UserError(f"a training process exited with code {code}; its message is above")
        failed.exit_code = code if code > 0 else 1
        raise failed from None


def _child_exit_code(error) -> int:
    """The exit code of the first failed rank in torchrun's ChildFailedError (2 for a user error)."""
    failures = getattr(error, "failures", {}) or {}
    codes = [f.exitcode for f in failures.values() if getattr(f, "exitcode", None)]
    return codes[0] if codes else 1


def _recipe_path(recipe: str) -> Path:
    return find_recipe(recipe).resolve()


@app.command()
def generate(
    path: Path = typer.Argument(..., help="Run directory (base + adapter) or merged model directory."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A user message (repeatable)."),
    max_new_tokens: int = typer.Option(128),
    system: Optional[str] = typer.Option(None, help="System prompt."),
):
    """Answer one or more prompts with a fine-tuned run or a merged model."""
    quiet_libraries()

    def go():
        model, tok = load_for_inference(path)
        for p in prompt:
            print(answer(model, tok, p, max_new_tokens, system))

    _exit(go)


@app.command()
def chat(
    path: Path = typer.Argument(..., help="Run directory or merged model directory."),
    max_new_tokens: int = typer.Option(256),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.0),
):
    """Chat interactively (empty line or /exit to leave, /reset to forget the conversation)."""
    quiet_libraries()

    def go():
        model, tok = load_for_inference(path)
        history: list[dict] = [{"role": "system", "content": system}] if system else []
        console.print(f"chatting with {path} (empty line or /exit to leave, /reset to start over)")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line or line == "/exit":
                break
            if line == "/reset":
                history = history[:1] if system else []
                continue
            history.append({"role": "user", "content": line})
            reply = gen(model, tok, history, max_new_tokens, temperature)
            history.append({"role": "assistant", "content": reply})
            print(f"bot> {reply}", flush=True)

    _exit(go)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="Run directory written by `loraforge train`."),
    out: Path = typer.Option(..., "--out", help="New directory for the merged model + tokenizer."),
):
    """Fold the adapter into the base model; plain transformers loads the result."""
    quiet_libraries()

    def go():
        console.print(f"merged model written to {do_merge(run_dir, out)}")

    _exit(go)


@app.command()
def recipes():
    """List the shipped recipes."""
    for p in sorted(shipped_dir("recipes").glob("*.yaml")):
        console.print(f"{p.stem:<32} {p}", highlight=False)


@app.command()
def env():
    """Show the detected hardware and library versions."""
    print(json.dumps({"hardware": detect(free_memory=True).to_dict(), "versions": library_versions()}, indent=2, default=str))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory written by `loraforge train` (or a merged model directory)."),
    gguf: bool = typer.Option(False, "--gguf", help="Write one GGUF file (llama.cpp, Ollama); the only format for now."),
    type_: str = typer.Option("f16", "--type", help="Weight type: f16 or q8_0."),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Merge the adapter and write a GGUF file (Llama and Qwen2 architectures) with tokenizer and chat template."""
    quiet_libraries()

    def go():
        if not gguf:
            raise UserError("export: choose a format with --gguf (for a transformers checkpoint use `loraforge merge`)")

        path = export_gguf(run_dir, out, type_.lower(), overwrite=overwrite)
        console.print(f"GGUF ({type_.lower()}, {path.stat().st_size / 2**20:.1f} MiB) written to {path}", highlight=False)

    _exit(go)


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory written by `loraforge train`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out data file (default: the run's eval split / eval sources)."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Eval loss and perplexity on held-out data: base model (adapter off) vs fine-tuned."""
    quiet_libraries()

    def go():
        report = evaluate_run(run_dir, data, batch_size)
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
            return
        table = Table(title=f"held-out eval: {report.examples} examples, {report.loss_tokens:,} scored tokens")
        table.add_column("model")
        table.add_column("loss", justify="right")
        table.add_column("perplexity", justify="right")
        table.add_row("base (adapter off)", f"{report.base.loss:.4f}", f"{report.base.perplexity:.3f}")
        table.add_row("fine-tuned", f"{report.fine_tuned.loss:.4f}", f"{report.fine_tuned.perplexity:.3f}", style="green")
        console.print(table)
        console.print(f"data: {report.data}", highlight=False, soft_wrap=True)

    _exit(go)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory written by `loraforge train`."),
):
    """Regenerate the run's plots (plots/*.png) and its model card (README.md)."""
    quiet_libraries()

    def go():
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"{run_dir}: no recipe.yaml; is this a loraforge run directory?")

        card = write_model_card(run_dir)
        plots = [run_dir / PLOTS_DIR / f for f in PLOT_FILES.values() if (run_dir / PLOTS_DIR / f).is_file()]
        for p in plots:
            console.print(f"plot: {p}", highlight=False)
        console.print(f"model card: {card}", highlight=False)

    _exit(go)


slurm_app = typer.Typer(no_args_is_help=True, help="Run on a SLURM cluster: render + sbatch a job, follow it.")
app.add_typer(slurm_app, name="slurm")


@slurm_app.command("submit")
def slurm_submit(
    recipe: str = typer.Argument(..., help="Recipe file or shipped recipe name."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes (M)."),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node", min=1, help="GPUs per node (N); with --cpu: CPU processes per node."),
    time_: Optional[str] = typer.Option(None, "--time", help="Time limit, e.g. 24:00:00 (default: the partition's)."),
    partition: Optional[str] = typer.Option(None, "--partition"),
    account: Optional[str] = typer.Option(None, "--account"),
    qos: Optional[str] = typer.Option(None, "--qos"),
    constraint: Optional[str] = typer.Option(None, "--constraint", help="Node features, e.g. a100-80g."),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", min=1, help="CPUs for each node's task."),
    setup: Optional[Path] = typer.Option(None, "--setup", help="Shell file copied into the script before launch (module loads, env activation)."),
    signal_lead: int = typer.Option(300, "--signal-lead", min=1, help="Seconds before the time limit at which SLURM sends USR1 (checkpoint + requeue)."),
    strategy: str = typer.Option("auto", "--strategy", help="auto | single | ddp | fsdp | zero2 | zero3 | zero3-offload"),
    cpu: bool = typer.Option(False, "--cpu", help="No GPUs: CPU processes over gloo (tests, debugging)."),
    hardware: Optional[str] = typer.Option(
        None, "--hardware", help="GPU profile of the compute nodes (e.g. a100-80gb): plan memory and strategy for them."),
    vram: Optional[float] = typer.Option(None, "--vram", help="Or their GB per GPU."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write and print the script; submit nothing."),
):
    """Render the sbatch script from RECIPE and the plan (global batch kept for nodes x GPUs), write it next to
    the run directory, and submit it; prints the job id and the log path."""

    def go():
        if setup is not None and not setup.is_file():
            raise UserError(f"--setup {setup}: no such file")
        r = _load(recipe, set_)
        opts = slurm.SlurmOptions(
            nodes=nodes, gpus_per_node=gpus_per_node, time=time_, partition=partition, account=account, qos=qos,
            constraint=constraint, cpus_per_task=cpus_per_task, setup=setup.read_text() if setup else None, cpu=cpu,
            signal_lead_s=signal_lead, job_name=f"lf-{Path(r.output_dir).name}", strategy=strategy,
            hardware=hardware, vram=vram)
        composed = slurm.compose(r, str(_recipe_path(recipe)), opts, set_)
        workdir, run_dir = slurm.workdir_of(r.output_dir)
        files = slurm.job_files(run_dir)
        b = composed.batch
        err_console.print(
            f"[loraforge] strategy {composed.strategy} ({composed.why}); {nodes} node(s) x {gpus_per_node} "
            f"{'CPU process(es)' if cpu else 'GPU(s)'}; micro-batch {b.micro_batch_size} x accumulation "
            f"{b.gradient_accumulation_steps} x {b.world_size} = global batch {b.global_batch_size}",
            highlight=False, soft_wrap=True)
        for note in composed.notes:
            err_console.print(f"[loraforge] note: {note}", highlight=False, soft_wrap=True)
        text = slurm.render_script(composed, opts, run_dir, files, workdir, str(_recipe_path(recipe)))
        files.dir.mkdir(parents=True, exist_ok=True)
        files.script.write_text(text)
        if dry_run:
            print(text, end="")
            err_console.print(f"[loraforge] written to {files.script} (dry run: not submitted)", highlight=False)
            return
        job_id = slurm.submit(files.script, files, {"nodes": nodes, "gpus_per_node": gpus_per_node, "cpu": cpu})
        print(f"submitted job {job_id}")
        print(f"script: {files.script}")
        print(f"log: {files.log(job_id)}")
        print(f"run directory: {run_dir}")
        print(f"follow: loraforge slurm status {run_dir}")

    _exit(go)


@slurm_app.command("status")
def slurm_status(
    run_dir: Path = typer.Argument(..., help="The run directory (the recipe's output_dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """The SLURM job's state (squeue / sacct) and the run's progress (metrics.jsonl, checkpoints)."""

    def go():
        out = slurm.status(run_dir.resolve())
        if as_json:
            print(json.dumps(out, indent=2, default=str))
            return
        p = out["progress"]
        if "job_id" in out:
            j = out["job"]
            extra = ", ".join(f"{k} {v}" for k, v in j.items() if k not in ("state", "source") and v)
            print(f"job {out['job_id']}: {j['state']}" + (f" ({extra})" if extra else ""))
            print(f"log: {out['log']}")
        else:
            print(f"no job recorded in {out['jobs_file']}")
        step = p.get("step")
        total = f" of {p['max_steps']}" if p.get("max_steps") else ""
        print(f"run: {'finished' if p['finished'] else 'not finished'}; step {step if step is not None else '-'}{total}"
              + (f", loss {p['loss']:.4f}" if p.get("loss") is not None else "")
              + (f", world size {p['world_size']}" if p.get("world_size") else ""))
        print(f"latest checkpoint: {p['latest_checkpoint'] or '-'}")
        if p.get("preempted"):
            pr = p["preempted"]
            print(f"last preemption: {pr.get('signal')} after step {pr.get('step')} (restart {pr.get('slurm_restart_count')})")

    _exit(go)


@app.command(
    "check-gpu",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def check_gpu(ctx: typer.Context):
    """Predicted vs measured memory, micro-batch + 1, tokens/s, MFU on this GPU (--dry-run --card NAME: plan only).
    Options: see `loraforge check-gpu --help`."""
    code = check_main(list(ctx.args))
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
