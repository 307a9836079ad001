"""The model card: `README.md` in the run directory, written from what the run directory holds.

Base model, data sources and sizes, LoRA and training settings, results (train_summary.json,
metrics.jsonl, eval.json, samples.json), the plots (report.py), and how to load the adapter with peft and
the merged model with transformers. It reads files only (no model is loaded), so it is cheap to call
at the end of training and again from `loraforge report`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from loraforge.rundir import (
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    DONE_FILE,
    EVAL_FILE,
    PLAN_FILE,
    PLOTS_DIR,
    RECIPE_FILE,
    SAMPLES_FILE,
    SOURCE_FILE,
    VERSIONS_FILE,
    read_json,
    read_metrics,
)
from loraforge.use.report import PLOT_FILES, make_plots, memory_numbers

log = logging.getLogger("loraforge")

PLOT_TITLES = {
    "loss": "Loss (train and eval)",
    "learning_rate": "Learning rate",
    "throughput": "Throughput",
    "memory": "Memory: predicted plan vs measured peak",
}


def _json(path: Path):
    return read_json(path)


def _json_list(path: Path) -> list:
    """A JSON list (samples.json's rows); [] when the file is missing, unreadable or holds something else."""
    return read_json(path, [], kind=list)


def _yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _cell(value) -> str:
    """A value as one Markdown table cell (no newlines, pipes escaped)."""
    text = "—" if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _cell(value)
    if isinstance(value, float):
        return f"{value:,.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return _cell(value)


def _table(rows: list[tuple[str, object]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_fmt(v)} |" for k, v in rows if v is not None]
    return lines


def _is_hub_id(name: str) -> bool:
    return (
        isinstance(name, str) and name.count("/") == 1 and not name.startswith(("pkg:", ".", "/", "~"))
        and not name.endswith(".gguf") and not Path(name).expanduser().exists()
    )


def _source_line(src: dict) -> str:
    if src.get("hub"):
        where = f"hub dataset `{src['hub']}`" + (f" ({src['subset']})" if src.get("subset") else "") + f", split `{src.get('split', 'train')}`"
    else:
        where = f"`{src.get('path')}`"
    extras = []
    if src.get("format") and src["format"] != "auto":
        extras.append(f"format {src['format']}")
    if src.get("max_samples"):
        extras.append(f"first {src['max_samples']:,} records")
    return f"- {where}" + (f" ({', '.join(extras)})" if extras else "")


def _last(records: list[dict], key: str):
    for r in reversed(records):
        if isinstance(r.get(key), (int, float)):
            return r[key]
    return None


@dataclass(frozen=True)
class _Run:
    """What the card says, read from the run directory once."""

    dir: Path  # as given (plot paths are shown relative to it)
    path: Path  # resolved: the paths the card's commands use
    recipe: dict
    adapter: dict
    plan: dict
    summary: dict | None  # None: training has not finished
    samples: list
    evaluation: object
    versions: dict
    records: list[dict]
    recipe_file: str | None  # the recipe the run was started from (source.json)

    def section(self, name: str) -> dict:
        return self.recipe.get(name, {}) or {}

    @property
    def base_name(self) -> str:
        return self.section("model").get("name_or_path") or self.adapter.get("base_model_name_or_path") or "unknown"

    @property
    def base_path(self) -> str:
        return self.adapter.get("base_model_name_or_path") or self.base_name

    @property
    def qlora(self) -> bool:
        return self.section("quantization").get("mode") in ("4bit", "8bit")

    @property
    def memory(self) -> dict:
        """report.memory_numbers: read only when the card has results to show."""
        return memory_numbers(self.dir)


def _read_run(run_dir: Path) -> _Run:
    return _Run(
        dir=run_dir,
        path=run_dir.resolve(),
        recipe=_yaml(run_dir / RECIPE_FILE),
        adapter=_json(run_dir / ADAPTER_CONFIG_FILE) or {},
        plan=_json(run_dir / PLAN_FILE) or {},
        summary=_json(run_dir / DONE_FILE),
        samples=_json_list(run_dir / SAMPLES_FILE),
        evaluation=_json(run_dir / EVAL_FILE),
        versions=_json(run_dir / VERSIONS_FILE) or {},
        records=read_metrics(run_dir),
        recipe_file=(_json(run_dir / SOURCE_FILE) or {}).get("recipe"),
    )


def _present_plots(run_dir: Path) -> dict[str, Path]:
    return {name: run_dir / PLOTS_DIR / f for name, f in PLOT_FILES.items() if (run_dir / PLOTS_DIR / f).is_file()}


def _header(run: _Run) -> list[str]:
    """The YAML front matter the hub reads, the title and one line on what this is."""
    out = ["---", "library_name: peft"]
    if _is_hub_id(run.base_name):
        out.append(f"base_model: {run.base_name}")
    out += ["pipeline_tag: text-generation", "tags:", "- loraforge", "- lora"] + (["- qlora"] if run.qlora else []) + ["- sft", "---", ""]
    kind = "QLoRA" if run.qlora else "LoRA"
    out.append(f"# {run.path.name}: {kind} adapter for {run.base_name}")
    out.append("")
    status = "finished" if run.summary is not None else "not finished (no train_summary.json yet)"
    out.append(
        f"A {kind} adapter fine-tuned with loraforge "
        f"(transformers + peft + trl `SFTTrainer`). Training {status}."
    )
    out.append("")
    return out


def _base_model(run: _Run) -> list[str]:
    model, quant, base_name = run.section("model"), run.section("quantization"), run.base_name
    out = ["## Base model", ""]
    out.append(f"- `{base_name}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else ""))
    if str(base_name).startswith("pkg:") or str(base_name).endswith(".gguf"):
        out.append(f"- a GGUF file, dequantised once by loraforge into the safetensors checkpoint `{run.base_path}`")
    if run.qlora:
        out.append(f"- loaded in {quant.get('mode')} ({quant.get('quant_type')}, double quant {quant.get('double_quant')}) for training")
    out.append(f"- `trust_remote_code`: {model.get('trust_remote_code', False)}")
    out.append("")
    return out


def _data(run: _Run) -> list[str]:
    data, plan = run.section("data"), run.plan
    out = ["## Data", ""]
    for src in data.get("sources") or []:
        out.append(_source_line(src))
    if data.get("eval_sources"):
        out.append("")
        out.append("Eval sources:")
        out += [_source_line(src) for src in data["eval_sources"]]
    if run.recipe_file:
        out += ["", f"(Relative paths are relative to the recipe, `{run.recipe_file}`.)"]
    out.append("")
    stats = plan.get("data") or {}
    out += _table([
        ("training examples", stats.get("train_examples")),
        ("eval examples", stats.get("eval_examples")),
        ("held out for eval (data.eval_split)", data.get("eval_split") or None),
        ("training tokens (per epoch)", stats.get("train_tokens")),
        ("longest example (tokens)", stats.get("longest_sample_tokens")),
        ("max_seq_length", plan.get("max_seq_length", data.get("max_seq_length"))),
        ("examples truncated", stats.get("truncated_examples")),
        ("loss on", data.get("loss_on")),
        ("packing", data.get("packing")),
        ("system prompt", data.get("system_prompt")),
    ])
    out.append("")
    return out


def _lora(run: _Run) -> list[str]:
    adapter, lora = run.adapter, run.section("lora")
    targets = adapter.get("target_modules") or lora.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(sorted(targets))
    out = ["## LoRA", ""]
    out += _table([
        ("rank r", adapter.get("r", lora.get("r"))),
        ("alpha", adapter.get("lora_alpha", lora.get("alpha"))),
        ("dropout", adapter.get("lora_dropout", lora.get("dropout"))),
        ("target modules", targets),
        ("DoRA", adapter.get("use_dora", lora.get("use_dora"))),
        ("rsLoRA", adapter.get("use_rslora", lora.get("use_rslora"))),
        ("modules saved in full", ", ".join(lora["modules_to_save"]) if lora.get("modules_to_save") else None),
        ("quantization", run.section("quantization").get("mode", "none")),
        ("trainable parameters", (run.summary or {}).get("trainable_params")),
        ("total parameters", (run.summary or {}).get("total_params")),
    ])
    out.append("")
    return out


def _hardware(plan: dict):
    """'2 x NVIDIA H200, 2 nodes', or the hardware kind when the plan names no GPUs."""
    hw = plan.get("hardware") or {}
    gpus = hw.get("gpus") or []
    hardware = hw.get("kind")
    if gpus:
        names = {g.get("name") for g in gpus if isinstance(g, dict)}
        hardware = f"{len(gpus)} x {', '.join(sorted(n for n in names if n))}"
    if hw.get("num_nodes", 1) and hw.get("num_nodes", 1) > 1:
        hardware = f"{hardware}, {hw['num_nodes']} nodes"
    return hardware


def _batch(plan: dict) -> str | None:
    if not plan.get("micro_batch_size"):
        return None
    return (f"{plan.get('global_batch_size')} = {plan.get('micro_batch_size')} micro-batch x "
            f"{plan.get('gradient_accumulation_steps')} accumulation x {plan.get('world_size', 1)} process(es)")


def _training(run: _Run) -> list[str]:
    plan, training = run.plan, run.section("training")
    precision = (plan.get("precision") or {}).get("label") if isinstance(plan.get("precision"), dict) else plan.get("precision")
    max_steps = training.get("max_steps")
    out = ["## Training", ""]
    out += _table([
        ("epochs", training.get("epochs") if not max_steps or max_steps < 0 else None),
        ("max steps", max_steps if max_steps and max_steps > 0 else None),
        ("learning rate", training.get("learning_rate")),
        ("scheduler", training.get("lr_scheduler")),
        ("warmup", training.get("warmup")),
        ("weight decay", training.get("weight_decay")),
        ("optimizer", training.get("optimizer")),
        ("global batch (sequences per step)", _batch(plan) or training.get("global_batch_size")),
        ("precision", precision),
        ("gradient checkpointing", plan.get("gradient_checkpointing")),
        ("seed", training.get("seed")),
        ("hardware", _hardware(plan)),
    ])
    out.append("")
    return out


def _results(run: _Run) -> list[str]:
    """The Results heading and its table of losses, tokens, speed and memory (or a line saying there are none)."""
    out = ["## Results", ""]
    records = run.records
    if run.summary is None and not records:
        return out + ["No results yet: the run has not logged any metrics.", ""]
    s = run.summary or {}
    eval_loss = s.get("eval_loss", _last(records, "eval_loss"))
    rows = [
        ("optimizer steps", s.get("steps", _last(records, "step"))),
        ("epochs completed", _last(records, "epoch")),
        ("train loss (mean over the run)", s.get("train_loss")),
        ("train loss (last logged)", _last([r for r in records if "loss" in r], "loss")),
        ("eval loss", eval_loss),
        ("eval perplexity", math.exp(eval_loss) if isinstance(eval_loss, (int, float)) and eval_loss < 700 else None),
        ("tokens seen (non-padding)", s.get("tokens_seen") or (int(_last(records, "num_tokens")) if _last(records, "num_tokens") else None)),
        ("throughput (tokens/s)", s.get("tokens_per_second")),
        ("wall time (s)", s.get("wall_s")),
    ]
    memory = run.memory
    rows.append(("predicted peak memory (GiB)", memory["predicted"]))
    kind = f", {memory['measured_kind']}" if memory.get("measured_kind") else ""
    rows.append((f"measured peak memory (GiB{kind})", memory["measured"]))
    return out + _table(rows) + [""]


def _eval(run: _Run) -> list[str]:
    """`loraforge eval`'s base vs fine-tuned loss and perplexity (eval.json), if it has run."""
    evaluation = run.evaluation
    if not (isinstance(evaluation, dict) and evaluation.get("base") and evaluation.get("fine_tuned")):
        return []
    out = [f"`loraforge eval` on {evaluation.get('data')} ({evaluation.get('examples')} examples, "
           f"{evaluation.get('loss_tokens'):,} scored tokens):", ""]
    out += ["| model | loss | perplexity |", "|---|---|---|"]
    for label, key in (("base (adapter off)", "base"), ("fine-tuned", "fine_tuned")):
        score = evaluation[key]
        out.append(f"| {label} | {_fmt(score.get('loss'))} | {_fmt(score.get('perplexity'))} |")
    out.append("")
    return out


def _samples(run: _Run) -> list[str]:
    if not run.samples:
        return []
    out = ["Answers to the recipe's sample prompts, base model vs fine-tuned:", ""]
    out += ["| prompt | base model | fine-tuned |", "|---|---|---|"]
    out += [f"| {_cell(r.get('prompt'))} | {_cell(r.get('base'))} | {_cell(r.get('fine_tuned'))} |" for r in run.samples]
    out.append("")
    return out


def _plots(run_dir: Path, plots: dict[str, Path]) -> list[str]:
    if not plots:
        return []
    out = ["## Plots", ""]
    for name, path in plots.items():
        rel = Path(path).relative_to(run_dir) if Path(path).is_relative_to(run_dir) else Path(path)
        out += [f"![{PLOT_TITLES.get(name, name)}]({rel.as_posix()})", ""]
    return out


def _how_to_use(run: _Run) -> list[str]:
    """Loading the adapter with peft, merging it for plain transformers, exporting GGUF, the other commands."""
    base_name, base_path, run_path = run.base_name, run.base_path, run.path
    base_for_code = base_name if _is_hub_id(base_name) else base_path
    out = ["## How to use", "", "With peft (base model + this adapter):", "", "```python",
           "from peft import PeftModel",
           "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f'base = AutoModelForCausalLM.from_pretrained("{base_for_code}", dtype="auto")',
           f'model = PeftModel.from_pretrained(base, "{run_path}")',
           f'tokenizer = AutoTokenizer.from_pretrained("{run_path}")',
           'messages = [{"role": "user", "content": "Hello!"}]',
           "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
           "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
           "```", ""]
    if not _is_hub_id(base_name) and base_path != base_name:
        out += [f"(`{base_path}` is loraforge's cached copy of `{base_name}` on the training machine; elsewhere, "
                "point it at your copy of the base model.)", ""]
    out += ["As one merged model that plain transformers loads (the adapter folded into the weights):", "", "```bash",
            f"loraforge merge {run_path} --out {run_path}/merged", "```", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{run_path}/merged")',
            f'tokenizer = AutoTokenizer.from_pretrained("{run_path}/merged")', "```", "",
            "For llama.cpp / Ollama (Llama and Qwen2 architectures), one GGUF file with the tokenizer and chat template:",
            "", "```bash", f"loraforge export {run_path} --gguf --type q8_0 --out {run_path}/model-q8_0.gguf", "```", "",
            "Other commands: "
            f"`loraforge chat {run_path}`, `loraforge eval {run_path}` (loss and perplexity, base vs fine-tuned), "
            f"`loraforge report {run_path}` (this card and its plots again).", ""]
    return out


def _files(run: _Run) -> list[str]:
    return ["## Files", "",
            "`adapter_model.safetensors` + `adapter_config.json` (the adapter), the tokenizer, `recipe.yaml` (the "
            "resolved recipe, every default), `plan.json` (plan, hardware, data statistics), `metrics.jsonl` (per "
            "logging step), `train_summary.json`, `versions.json`.", ""]


def _versions(run: _Run) -> list[str]:
    if not run.versions:
        return []
    keys = ("python", "loraforge", "torch", "transformers", "peft", "trl", "accelerate", "datasets")
    return ["Versions: " + ", ".join(f"{k} {run.versions[k]}" for k in keys if k in run.versions) + ".", ""]


SECTIONS = (_header, _base_model, _data, _lora, _training, _results, _eval, _samples)  # then the plots
CLOSING = (_how_to_use, _files, _versions)


def build_card(run_dir: str | Path, plots: dict[str, Path] | None = None) -> str:
    """The model card's Markdown for `run_dir` (plots: {name: path} to embed; default: those present)."""
    run_dir = Path(run_dir)
    run = _read_run(run_dir)
    if plots is None:
        plots = _present_plots(run_dir)
    out: list[str] = []
    for section in SECTIONS:
        out += section(run)
    out += _plots(run_dir, plots)
    for section in CLOSING:
        out += section(run)
    return "\n".join(out)


def write_model_card(run_dir: str | Path, plots: bool = True) -> Path:
    """Write `RUN_DIR/README.md` (and, with `plots`, regenerate the PNGs it embeds first). A plotting
    failure is logged and the card is written without those pictures."""
    run_dir = Path(run_dir)
    made = None
    if plots:
        try:
            made = make_plots(run_dir)
        except Exception as e:  # noqa: BLE001 - pictures are a nicety; the card must still be written
            log.warning("could not draw the plots (%s: %s); writing the model card without them", type(e).__name__, e)
    path = run_dir / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(build_card(run_dir, made), encoding="utf-8")
    tmp.replace(path)
    return path
