"""`loraforge plan`: the plan for this machine or for a hardware profile, with the memory breakdown.

A model directory holding only config.json is enough: without a tokenizer the data is not read (no truncation
statistics) and the plan uses the recipe's sequence length. With --hardware / --vram and such a directory
nothing imports torch, so a plan (even for 70B) prints in well under 2 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.data.pairs import prepare_preference
from loraforge.data.prepare import prepare
from loraforge.errors import UserError
from loraforge.model.trace import trace_step
from loraforge.plan.hardware import detect
from loraforge.plan.memory import estimate, read_model_config, shape_from_config
from loraforge.plan.planner import Plan, make_plan, setup_for, unfit_message
from loraforge.plan.profiles import hardware_for
from loraforge.plan.strategy import STRATEGIES, choose_strategy
from loraforge.run.pref_trace import trace_preference_step

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def config_only_dir(recipe) -> Path | None:
    """The model directory when it holds a config.json but no tokenizer (nothing to read the data with)."""
    name = recipe.model.name_or_path
    if name.startswith("pkg:") or name.endswith(".gguf"):
        return None
    p = recipe.resolve_path(name)
    if p.is_dir() and (p / "config.json").is_file() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        return p
    return None


def hardware(recipe, profile: str | None, vram: float | None, gpus: int | None, nodes: int, strategy: str | None):
    if strategy is not None and strategy != "auto":
        if strategy not in STRATEGIES:
            raise UserError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}")
    strategy = None if strategy in (None, "auto") else strategy
    if profile is not None or vram is not None:
        return hardware_for(profile, vram, gpus, nodes, strategy)
    here = detect(force_cpu=recipe.training.device == "cpu", free_memory=True)
    if gpus is None and nodes == 1 and strategy is None:
        return here
    return hardware_for(None, None, gpus, nodes, strategy, detected=here)


@dataclass
class PlanView:
    """What `loraforge plan` shows and `loraforge launch` / `slurm submit` act on: the one Plan every process
    will compute, with the hardware it is for and what was learnt on the way (data, model size, trace)."""

    plan: Plan
    hw: object  # plan.hardware.Hardware of the target topology
    data: dict | None = None
    notes: tuple[str, ...] = ()
    model: dict | None = None
    trace: dict | None = None

    @property
    def all_notes(self) -> list[str]:
        return self.plan.to_dict()["notes"] + list(self.notes)

    def to_dict(self) -> dict:
        out = self.plan.to_dict() | {"hardware": self.hw.to_dict(), "data": self.data}
        out["notes"] = self.all_notes
        if self.model is not None:
            out["model"] = self.model
        if self.trace is not None:
            out["trace"] = self.trace
        return out


def build(recipe, hw, trace: bool = False) -> PlanView:
    """The plan for `recipe` on `hw`: from the data and the model when they are here, from config.json alone
    when that is all the model directory holds."""
    notes: list[str] = []
    data = None
    cfg_dir = config_only_dir(recipe)
    if cfg_dir is not None:
        cfg = read_model_config(str(cfg_dir))
        shape = shape_from_config(cfg, cfg_dir.name)
        model_max = cfg.get("max_position_embeddings")
        plan = make_plan(recipe, hw, model_max or 2048, model_max, shape=shape, lengths=None)
        notes.append(f"{cfg_dir} holds only config.json: data not read (no tokenizer), no truncation statistics")
        if model_max and plan.max_seq_length > model_max:
            notes.append(f"data.max_seq_length {plan.max_seq_length} is beyond the model's context of {model_max}")
    else:
        # DPO / ORPO pairs (data/pairs.py); the start adapter is checked when the run starts
        prep = prepare(recipe, hw) if recipe.training.method == "sft" else prepare_preference(recipe, hw, check_adapter=False)
        plan, data, shape = prep.plan, prep.data_summary(), prep.shape
    model = None
    if shape is not None:
        model = {"name": shape.name or recipe.model.name_or_path, "params_b": round(shape.total_params / 1e9, 3),
                 "lora_params_m": round(shape.lora_params(recipe.lora.r, recipe.lora.target_modules) / 1e6, 2)}
    view = PlanView(plan, hw, data, tuple(notes), model)
    if trace:
        view.trace = run_trace(recipe, hw, plan, shape)
    return view


@dataclass
class LaunchPlan:
    strategy: str
    why: str
    view: PlanView  # what every process will compute, for the target topology

    @property
    def hw(self):
        return self.view.hw

    @property
    def plan(self) -> Plan:
        return self.view.plan


def plan_launch(recipe, strategy: str, per_node: int | None, nodes: int, hardware_name: str | None = None,
                vram: float | None = None) -> LaunchPlan:
    """Plan for the target topology with the memory model, pick the strategy from whether the model fits
    replicated, and refuse a plan that does not fit. Shared by `loraforge launch` and `loraforge slurm`."""

    def plan_for(strat: str) -> PlanView:
        return build(recipe, hardware(recipe, hardware_name, vram, per_node, nodes, None if strat == "single" else strat))

    view = plan_for("ddp" if strategy == "auto" else strategy)
    chosen, why = choose_strategy(strategy, view.hw.world_size, recipe.quantization.mode, fits_replicated=view.plan.fits)
    if chosen != view.plan.strategy:
        view = plan_for(chosen)
    if view.plan.fits is False:
        raise UserError(unfit_message(view.to_dict()))
    return LaunchPlan(chosen, why, view)


def run_trace(recipe, hw, plan, shape) -> dict:
    """One traced step (FakeTensorMode) of the plan's setting (SFT, or the DPO / ORPO step), beside the analytic
    tensor peak."""
    if shape is None:
        raise UserError("--trace: the memory model does not know this architecture")
    setup = setup_for(recipe, plan.precision, hw, "single", plan.max_seq_length).with_(
        micro_batch=plan.batch.micro_batch_size, gradient_checkpointing=plan.gradient_checkpointing, world_size=1,
    )
    if plan.strategy not in ("single", "ddp"):
        raise UserError(f"--trace runs one process; strategy {plan.strategy} shards across processes")
    if setup.quant == "8bit":
        raise UserError("--trace: 8-bit bases are not traced (4-bit and none are)")
    notes = []
    if setup.optimizer not in ("adamw_torch", "adamw_torch_fused"):  # the trace steps torch's AdamW
        notes.append(f"traced and compared with adamw_torch in place of {setup.optimizer}")
        setup = setup.with_(optimizer="adamw_torch")
    result = (trace_preference_step if setup.preference else trace_step)(shape, setup)
    analytic = estimate(shape, setup).tensor_peak
    return result.to_dict() | {"analytic_tensor_peak_gib": round(analytic / 2**30, 4),
                               "analytic_over_trace": round(analytic / result.peak_bytes, 4), "notes": notes}


def render(out: dict, title: str, console) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key in ("micro_batch_size", "gradient_accumulation_steps", "world_size", "global_batch_size",
                "max_seq_length", "gradient_checkpointing", "strategy", "rows_per_forward", "loss_head"):
        table.add_row(key, str(out[key]))
    table.add_row("precision", out["precision"]["label"])
    hw = out["hardware"]
    where = hw["kind"]
    if hw["gpus"]:
        per_node = len(hw["gpus"])
        where += f" ({hw['num_nodes']} node(s) x {per_node} x {hw['gpus'][0]['name']}, {hw['gpus'][0]['total_gib']:.1f} GiB)"
    if hw.get("profile"):
        where += f" [profile {hw['profile']}]"
    table.add_row("hardware", where)
    if out.get("predicted_peak_gib") is not None:
        verdict = "fits" if out["fits"] else "DOES NOT FIT"
        table.add_row("memory", f"{out['predicted_peak_gib']:.2f} GiB predicted per device of {out['budget_gib']:.2f} GiB: {verdict}")
    for k, v in (out.get("data") or {}).items():
        table.add_row(f"data.{k}", str(v))
    for note in out["notes"]:
        table.add_row("note", note)
    for s in out.get("suggestions") or []:
        table.add_row("would fit", s)
    console.print(table)
    if out.get("breakdown"):
        console.print("[bold]predicted peak memory per device[/]")
        mem = Table()
        mem.add_column("part")
        mem.add_column("GiB", justify="right")
        for k, v in out["breakdown"].items():
            mem.add_row(k.replace("_", " "), f"{v:.2f}")
        mem.add_row("total", f"{out['predicted_peak_gib']:.2f}", style="bold")
        console.print(mem)
    if out.get("trace"):
        t = out["trace"]
        console.print(
            f"trace (FakeTensorMode, one real step): {t['peak_gib']:.3f} GiB of live tensors; analytic "
            f"{t['analytic_tensor_peak_gib']:.3f} GiB (x{t['analytic_over_trace']:.3f}); {t['seconds']:.0f} s",
            highlight=False,
        )
