"""The `loraforge` command: parse, call one function, print. User errors exit 2 with one line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal LMs with LoRA/QLoRA; one recipe from a laptop CPU to a SLURM cluster.",
)
console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override a recipe field, e.g. --set training.learning_rate=1e-4 (repeatable)."


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="[loraforge] %(message)s")
    from .secrets import install_log_filter

    install_log_filter()
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        import datasets

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


def run_guarded(fn: Callable[[], object]) -> int:
    """Run `fn`; a UserError prints one line and returns exit code 2 (no traceback)."""
    try:
        fn()
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def _exit(fn: Callable[[], object]) -> None:
    code = run_guarded(fn)
    if code:
        raise typer.Exit(code)


def _load(recipe: str, overrides: list[str]):
    from .recipe import load_recipe
    from .resources import find_recipe

    return load_recipe(find_recipe(recipe), overrides)


def _print_result(result) -> None:
    table = Table(title="loraforge run", show_header=False)
    table.add_row("run directory", str(result.run_dir))
    table.add_row("optimizer steps", str(result.steps))
    if result.train_loss is not None:
        table.add_row("train loss (mean)", f"{result.train_loss:.4f}")
    if result.eval_loss is not None:
        table.add_row("eval loss", f"{result.eval_loss:.4f}")
    if result.trained:
        table.add_row("wall time", f"{result.wall_s:.0f} s")
        table.add_row("trainable params", f"{result.trainable_params:,} of {result.total_params:,}")
    else:
        table.add_row("note", "already trained; use --overwrite to train again")
    console.print(table)
    if result.samples:
        samples = Table(title="base vs fine-tuned, on prompts not in the training data", show_lines=True)
        samples.add_column("prompt", style="bold")
        samples.add_column("base model")
        samples.add_column("fine-tuned", style="green")
        for row in result.samples:
            samples.add_row(row["prompt"], row["base"], row["fine_tuned"])
        console.print(samples)
    console.print(
        f"next: loraforge chat {result.run_dir}  |  loraforge generate {result.run_dir} --prompt '...'  |  "
        f"loraforge merge {result.run_dir} --out {result.run_dir}/merged",
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
        from .train import run

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
):
    """Show what a run would do: the resolved recipe (every default) and the plan for this hardware."""
    quiet_libraries()

    def go():
        from .hardware import detect
        from .recipe import dump_recipe
        from .train import prepare

        r = _load(recipe, set_)
        hw = detect(force_cpu=r.training.device == "cpu")
        prep = prepare(r, hw)
        out = prep.plan.to_dict() | {"hardware": hw.to_dict(), "data": prep.data_summary()}
        if as_json:
            print(json.dumps(out | {"recipe": r.to_dict()}, indent=2, default=str))
            return
        table = Table(title=f"plan for {recipe}", show_header=False)
        for key in ("micro_batch_size", "gradient_accumulation_steps", "world_size", "global_batch_size",
                    "max_seq_length", "gradient_checkpointing", "strategy"):
            table.add_row(key, str(out[key]))
        table.add_row("precision", out["precision"]["label"])
        table.add_row("hardware", hw.kind + (f" ({len(hw.gpus)} x {hw.gpus[0].name})" if hw.gpus else ""))
        table.add_row("trust_remote_code", str(r.model.trust_remote_code))
        for k, v in out["data"].items():
            table.add_row(f"data.{k}", str(v))
        for note in out["notes"]:
            table.add_row("note", note)
        console.print(table)
        console.print("[bold]resolved recipe[/] (every default shown):")
        console.print(dump_recipe(r), highlight=False)

    _exit(go)


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
        from .infer import answer, load_for_inference

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
        from .infer import generate as gen, load_for_inference

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
        from .infer import merge as do_merge

        console.print(f"merged model written to {do_merge(run_dir, out)}")

    _exit(go)


@app.command()
def recipes():
    """List the shipped recipes."""
    from .resources import shipped_dir

    for p in sorted(shipped_dir("recipes").glob("*.yaml")):
        console.print(f"{p.stem:<32} {p}", highlight=False)


@app.command()
def env():
    """Show the detected hardware and library versions."""
    from .hardware import detect
    from .train import library_versions

    print(json.dumps({"hardware": detect().to_dict(), "versions": library_versions()}, indent=2, default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
