"""Pictures of a run, from what its directory holds: loss (train and eval), learning rate and tokens/s
over steps (`metrics.jsonl`), and the memory plan as a stacked bar (`plan.json`: predicted breakdown vs
measured peak). PNG files under `RUN_DIR/plots/`, which the model card (`card.py`) embeds.

Matplotlib is used through its object API (`Figure` + the Agg canvas), never pyplot: no global backend
is switched, no window opens, and it works on a machine without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraforge.rundir import DONE_FILE, MEMORY_FILE, PLAN_FILE, PLOTS_DIR, read_json, read_metrics

log = logging.getLogger("loraforge")

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # -> every PNG is 800 x 450 pixels
PLOT_FILES = {
    "loss": "loss.png",
    "learning_rate": "learning_rate.png",
    "throughput": "throughput.png",
    "memory": "memory.png",
}
# keys a metrics record may carry a throughput under (a tracking callback may log one directly)
TOKENS_PER_S_KEYS = ("tokens_per_s", "tokens_per_second", "train_tokens_per_second", "tokens/s")
MEASURED_PEAK_KEYS = ("measured_peak_gib", "peak_memory_gib", "peak_mem_gib")


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(records: list[dict], key: str, where: str | None = None) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records (only those that also hold `where`, if given)."""
    xs, ys = [], []
    for r in records:
        v, s = _num(r.get(key)), _num(r.get("step"))
        if v is None or s is None or (where and where not in r):
            continue
        xs.append(s)
        ys.append(v)
    return xs, ys


def throughput(records: list[dict]) -> tuple[list[float], list[float], str]:
    """(steps, tokens/s, how it was measured). A logged rate is used as is; otherwise it is derived from
    consecutive training records' `num_tokens` (trl's count of non-padding tokens seen) and `time_s`."""
    for key in TOKENS_PER_S_KEYS:
        xs, ys = series(records, key)
        if xs:
            return xs, ys, f"logged `{key}`"
    train = [r for r in records if "loss" in r and _num(r.get("num_tokens")) is not None and _num(r.get("time_s")) is not None]
    xs, ys = [], []
    for prev, cur in zip(train, train[1:]):
        dt = cur["time_s"] - prev["time_s"]
        dn = cur["num_tokens"] - prev["num_tokens"]
        if dt > 0 and dn > 0:  # a resumed run restarts the clock: skip that gap
            xs.append(float(cur["step"]))
            ys.append(dn / dt)
    return xs, ys, "non-padding tokens between log steps / wall time"


def _lookup(obj: dict, key: str):
    """`obj[key]`, or the value under `key` one level down (e.g. plan.json's `memory` section)."""
    if key in obj:
        return obj[key]
    for value in obj.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def memory_numbers(run_dir: Path) -> dict:
    """{'breakdown': {category: GiB}, 'predicted': GiB|None, 'measured': GiB|None, 'reserved': GiB|None},
    from what the run wrote: plan.json (the memory model's prediction), memory.json (torch's peak
    allocated / reserved on a GPU), or a measured peak in train_summary.json or the metrics log."""
    run_dir = Path(run_dir)
    plan = read_json(run_dir / PLAN_FILE, {})
    summary = read_json(run_dir / DONE_FILE, {})
    raw = _lookup(plan, "breakdown")
    breakdown = {str(k): float(v) for k, v in raw.items() if _num(v) is not None and v > 0} if isinstance(raw, dict) else {}
    predicted = _num(_lookup(plan, "predicted_peak_gib"))
    readings = [v for v in read_json(run_dir / MEMORY_FILE, {}).values() if isinstance(v, dict)]
    allocated = [x for x in (_num(v.get("max_allocated_gib")) for v in readings) if x is not None]
    reserved = [x for x in (_num(v.get("max_reserved_gib")) for v in readings) if x is not None]
    measured = max(allocated) if allocated else None
    for source in (summary, plan):
        for key in MEASURED_PEAK_KEYS:
            measured = measured if measured is not None else _num(_lookup(source, key))
    if measured is None:  # the highest per-step reading, if the metrics log carries one
        logged = [_num(r.get(k)) for r in read_metrics(run_dir) for k in MEASURED_PEAK_KEYS]
        logged = [v for v in logged if v is not None]
        measured = max(logged) if logged else None
    kind = "torch peak allocated" if allocated else summary.get("memory_measured")
    return {"breakdown": breakdown, "predicted": predicted, "measured": measured,
            "reserved": max(reserved) if reserved else None, "measured_kind": kind}


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays fixed
    tmp.replace(path)
    return path


def plot_loss(records: list[dict], path: Path) -> Path | None:
    train = series(records, "loss")
    evals = series(records, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    fig, ax = _figure("Loss", "optimizer step", "loss")
    if train[0]:
        ax.plot(*train, label="train", color="tab:blue", marker="." if len(train[0]) < 50 else None)
    if evals[0]:
        ax.plot(*evals, label="eval", color="tab:orange", marker="o")
    ax.legend()
    return _save(fig, path)


def plot_learning_rate(records: list[dict], path: Path) -> Path | None:
    xs, ys = series(records, "learning_rate")
    if not xs:
        return None
    fig, ax = _figure("Learning rate", "optimizer step", "learning rate")
    ax.plot(xs, ys, color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _save(fig, path)


def plot_throughput(records: list[dict], path: Path) -> Path | None:
    xs, ys, how = throughput(records)
    if not xs:
        return None
    fig, ax = _figure(f"Throughput ({how})", "optimizer step", "tokens / s")
    ax.plot(xs, ys, color="tab:purple", marker="." if len(xs) < 50 else None)
    ax.set_ylim(bottom=0)
    return _save(fig, path)


def plot_memory(numbers: dict, path: Path) -> Path | None:
    """One stacked bar of the predicted breakdown (or the predicted total alone), and the measured peak."""
    breakdown, predicted, measured = numbers["breakdown"], numbers["predicted"], numbers["measured"]
    if not breakdown and predicted is None and measured is None:
        return None
    fig, ax = _figure("Memory plan: predicted vs measured peak", "", "GiB")
    labels, position = [], 0
    if breakdown or predicted is not None:
        bottom = 0.0
        if breakdown:
            palette = ["C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9"]  # C3 (red) is the measured bar's
            colors = [palette[i % len(palette)] for i in range(len(breakdown))]
            for (name, gib), color in zip(breakdown.items(), colors):
                ax.bar(position, gib, bottom=bottom, color=color, label=f"{name} ({gib:.2f})", width=0.6)
                bottom += gib
        else:
            ax.bar(position, predicted, color="tab:gray", width=0.6, label=f"predicted ({predicted:.2f})")
            bottom = predicted
        top = predicted if predicted is not None else bottom
        if predicted is not None and breakdown:
            ax.hlines(predicted, position - 0.4, position + 0.4, colors="black", linestyles="dashed",
                      label=f"predicted peak ({predicted:.2f})")
        ax.annotate(f"{top:.2f} GiB", (position, max(top, bottom)), ha="center", va="bottom")
        labels.append("predicted")
        position += 1
    reserved = numbers.get("reserved")
    if measured is not None:
        kind = numbers.get("measured_kind")
        ax.bar(position, measured, color="tab:red", width=0.6,
               label=f"measured peak{f' ({kind})' if kind else ''}: {measured:.2f}")
        ax.annotate(f"{measured:.2f} GiB", (position, measured), ha="center", va="bottom")
        if reserved is not None:
            ax.hlines(reserved, position - 0.4, position + 0.4, colors="darkred", linestyles="dotted",
                      label=f"measured peak reserved ({reserved:.2f})")
        labels.append("measured")
        position += 1
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.75, max(len(labels), 2) - 0.25)
    ax.grid(True, axis="x", alpha=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return _save(fig, path)


def make_plots(run_dir: str | Path) -> dict[str, Path]:
    """Write every plot the run's files allow; returns {name: path}. A plot with no data is not written
    (and a stale one from an earlier call is removed)."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    makers = {
        "loss": lambda p: plot_loss(records, p),
        "learning_rate": lambda p: plot_learning_rate(records, p),
        "throughput": lambda p: plot_throughput(records, p),
        "memory": lambda p: plot_memory(memory_numbers(run_dir), p),
    }
    written = {}
    for name, make in makers.items():
        path = out / PLOT_FILES[name]
        result = make(path)
        if result is None:
            path.unlink(missing_ok=True)
        else:
            written[name] = result
    return written
