"""What a finished run tells: `loraforge eval` (held-out loss and perplexity, base vs fine-tuned), the
plots (`loraforge report`) and the model card (README.md), on one tiny trained run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import chat_records, recipe_dict, write_jsonl
from typer.testing import CliRunner

from loraforge.cli import app

runner = CliRunner()
PNG_SIZE = (800, 450)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """10 steps on 24 chats, 8 held out (one eval batch of 8, so the trainer's eval_loss is one mean)."""
    from loraforge.recipe import load_recipe
    from loraforge.run.session import run

    tmp = tmp_path_factory.mktemp("report-run")
    data = write_jsonl(tmp / "train.jsonl", chat_records(32))
    d = recipe_dict(tiny_model_dir, data, tmp / "run",
                    data={"eval_split": 0.25},
                    training={"max_steps": 10, "global_batch_size": 8, "eval_steps": 5})
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    result = run(load_recipe(tmp / "recipe.yaml"), quiet=True)
    assert result.eval_loss is not None
    return result.run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        img.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == PNG_SIZE
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20  # something is drawn, not a blank canvas


# ---------------------------------------------------------------------------------------------- eval


def test_eval_matches_the_trainer_and_shows_the_gain(trained_run, tmp_path):
    from loraforge.use.evaluate import evaluate_run

    run_dir = _copy(trained_run, tmp_path)
    report = evaluate_run(run_dir)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert report.examples == 8
    # same examples, same masks, same truncation as training: the trainer's own eval loss
    assert report.fine_tuned.loss == pytest.approx(summary["eval_loss"], rel=1e-3)
    assert report.base.loss > report.fine_tuned.loss + 0.1
    assert report.fine_tuned.perplexity == pytest.approx(math.exp(report.fine_tuned.loss))
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["fine_tuned"]["loss"] == pytest.approx(report.fine_tuned.loss)
    assert "eval_split=0.25" in saved["data"]


def test_eval_cli_with_a_data_file_and_errors(trained_run, tmp_path):
    run_dir = _copy(trained_run, tmp_path)
    rows = chat_records(5)
    data = write_jsonl(tmp_path / "heldout.jsonl", rows)
    ok = runner.invoke(app, ["eval", str(run_dir), "--data", str(data), "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output)
    assert out["examples"] == 5 and out["data"] == str(data.resolve())
    assert out["base"]["loss"] > out["fine_tuned"]["loss"]
    table = runner.invoke(app, ["eval", str(run_dir), "--data", str(data)])
    assert table.exit_code == 0 and "base (adapter off)" in table.output and "fine-tuned" in table.output

    missing = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "not found" in missing.output
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["data"]["eval_split"] = 0.0
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    none = runner.invoke(app, ["eval", str(run_dir)])
    assert none.exit_code == 2 and "--data" in none.output and "Traceback" not in none.output


# --------------------------------------------------------------------------------------------- plots


def test_report_draws_loss_lr_throughput_and_memory(trained_run, tmp_path):
    from loraforge.rundir import read_metrics
    from loraforge.use.card import write_model_card
    from loraforge.use.report import make_plots, memory_numbers, throughput

    run_dir = _copy(trained_run, tmp_path)
    # what a GPU run writes: the memory model's prediction in plan.json, torch's peaks in memory.json
    plan = json.loads((run_dir / "plan.json").read_text())
    plan |= {"breakdown": {"weights": 0.5, "lora + optimizer": 0.1, "activations": 1.2, "cuda_context": 0.1},
             "predicted_peak_gib": 1.9}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    (run_dir / "memory.json").write_text(json.dumps({
        "first_step": {"max_allocated_gib": 1.5, "max_reserved_gib": 1.7, "predicted_peak_gib": 1.9},
        "end": {"max_allocated_gib": 1.6, "max_reserved_gib": 1.8, "predicted_peak_gib": 1.9},
    }))
    numbers = memory_numbers(run_dir)
    assert numbers["measured"] == 1.6 and numbers["reserved"] == 1.8 and numbers["predicted"] == 1.9
    assert sum(numbers["breakdown"].values()) == pytest.approx(1.9)

    plots = make_plots(run_dir)
    assert set(plots) == {"loss", "learning_rate", "throughput", "memory"}
    for path in plots.values():
        _assert_png(path)
    text = write_model_card(run_dir).read_text()
    assert "| predicted peak memory (GiB) | 1.9 |" in text
    assert "| measured peak memory (GiB, torch peak allocated) | 1.6 |" in text
    assert "](plots/memory.png)" in text
    steps, rates, _ = throughput(read_metrics(run_dir))
    assert steps and all(r > 0 for r in rates)


def test_plots_cope_with_missing_numbers(trained_run, tmp_path):
    from loraforge.use.report import make_plots, plot_memory, throughput

    # no memory numbers at all (an older plan.json): no memory plot, the rest still drawn
    run_dir = _copy(trained_run, tmp_path)
    plan = json.loads((run_dir / "plan.json").read_text())
    for key in ("memory", "breakdown", "predicted_peak_gib", "measured_peak_gib"):
        plan.pop(key, None)
    (run_dir / "memory.json").unlink(missing_ok=True)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    (run_dir / "train_summary.json").write_text(json.dumps({k: v for k, v in summary.items() if "memory" not in k}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if "memory" not in k}) + "\n" for r in records))
    (run_dir / "plan.json").write_text(json.dumps(plan))
    assert set(make_plots(run_dir)) == {"loss", "learning_rate", "throughput"}
    # each part of the memory picture alone
    for numbers in (
        {"breakdown": {}, "predicted": 2.0, "measured": None},
        {"breakdown": {}, "predicted": None, "measured": 1.5, "reserved": 1.7},
        {"breakdown": {"weights": 0.3, "activations": 0.2}, "predicted": None, "measured": None},
    ):
        _assert_png(plot_memory(numbers, tmp_path / "m.png"))
    assert plot_memory({"breakdown": {}, "predicted": None, "measured": None}, tmp_path / "none.png") is None
    # a logged rate wins over the derived one; no metrics at all -> no plots, no error
    assert throughput([{"step": 1, "tokens_per_s": 5.0}, {"step": 2, "tokens_per_s": 7.0}])[1] == [5.0, 7.0]
    (run_dir / "metrics.jsonl").unlink()
    assert make_plots(run_dir) == {}
    assert not list((run_dir / "plots").glob("*.png"))  # stale pictures are not left behind


# ---------------------------------------------------------------------------------------------- card


def test_model_card_describes_the_run(trained_run, tmp_path):
    from loraforge.use.card import write_model_card

    run_dir = _copy(trained_run, tmp_path)
    (run_dir / "eval.json").write_text(json.dumps({
        "data": "the run's eval data", "examples": 8, "loss_tokens": 40,
        "base": {"loss": 5.5, "perplexity": 244.7}, "fine_tuned": {"loss": 1.25, "perplexity": 3.49},
    }))
    card = write_model_card(run_dir)
    assert card == run_dir / "README.md"
    text = card.read_text()
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())

    assert "More Information Needed" not in text  # peft's empty template is replaced
    assert recipe["model"]["name_or_path"] in text  # base model
    assert recipe["data"]["sources"][0]["path"] in text  # data source ...
    assert f"| training examples | {plan['data']['train_examples']} |" in text  # ... and sizes
    assert f"| eval examples | {plan['data']['eval_examples']} |" in text
    assert "| rank r | 8 |" in text and "| alpha | 16 |" in text  # LoRA settings
    assert "| learning rate | 0.005 |" in text and "| scheduler | constant |" in text  # training settings
    assert f"| optimizer steps | {summary['steps']} |" in text  # results
    assert f"| eval loss | {summary['eval_loss']:.4g} |" in text
    assert "| fine-tuned | 1.25 | 3.49 |" in text  # loraforge eval, side by side
    for name in ("loss", "learning_rate", "throughput"):
        assert f"](plots/{name}.png)" in text and (run_dir / "plots" / f"{name}.png").is_file()
    assert f'PeftModel.from_pretrained(base, "{run_dir.resolve()}")' in text  # how to load the adapter
    assert f'AutoModelForCausalLM.from_pretrained("{run_dir.resolve()}/merged")' in text  # ... and the merged model
    assert f"loraforge merge {run_dir.resolve()} --out" in text and "loraforge export" in text


def test_model_card_of_an_unfinished_run(trained_run, tmp_path):
    from loraforge.use.card import write_model_card

    run_dir = _copy(trained_run, tmp_path)
    for name in ("train_summary.json", "metrics.jsonl", "samples.json"):
        (run_dir / name).unlink(missing_ok=True)
    text = write_model_card(run_dir).read_text()
    assert "not finished" in text and "No results yet" in text and "## How to use" in text


def test_report_cli(trained_run, tmp_path):
    run_dir = _copy(trained_run, tmp_path)
    (run_dir / "README.md").unlink()
    ok = runner.invoke(app, ["report", str(run_dir)])
    assert ok.exit_code == 0, ok.output
    assert (run_dir / "README.md").is_file() and "loss.png" in ok.output
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "recipe.yaml" in bad.output


def test_model_card_shows_the_sample_answers(tmp_path):
    """samples.json is a list of rows (as the run writes it); the card shows them, pipes and newlines escaped."""
    from loraforge.rundir import write_json
    from loraforge.use.card import build_card

    write_json(tmp_path / "samples.json", [{"prompt": "Hi |\nthere", "base": "hello", "fine_tuned": "Hello! How can I help?"}])
    text = build_card(tmp_path, {})
    assert "Answers to the recipe's sample prompts, base model vs fine-tuned:" in text
    assert "| Hi \\| there | hello | Hello! How can I help? |" in text
