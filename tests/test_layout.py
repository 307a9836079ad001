"""The package's shape, read from its source with `ast` (nothing is imported): layers, import direction, sizes.

    ground   loraforge.{errors, recipe (+ preference_recipe, recipe_rules), resources, redact, rundir, checkpoints, versions}
    plan/    strategy, hardware + profiles, arch, memory, flops, planner, gpu_pin   (pure; no torch for `plan`)
    model/   quant, modeling, trace, lmhead
    data/    dataset, tokencache, prepare
    use/     infer, samples, evaluate, export, card, report
    run/     session (the stages), sftconfig, trainer, batching, callbacks, memguard, memreport, saving, ...
    launch/  accelerate, preview, slurm
    top      cli, train, console, __main__

A module imports only from its own layer or the layers below it, never in a circle, and imports loraforge's
modules at its top. The one exception: a module whose own top imports torch/transformers/trl/... (directly or
through another loraforge module: "heavy") may be imported inside the function that needs it, so that
`loraforge plan` and `--help` never load torch, and a lone process pins its GPU before CUDA starts.
`loraforge plan` on a config-only directory importing no torch is proved in test_memory_plan.py
(test_plan_for_70b_needs_no_torch)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
README = Path(__file__).resolve().parents[1] / "README.md"
HEAVY_LIBS = {"torch", "transformers", "trl", "peft", "deepspeed", "bitsandbytes", "accelerate", "datasets"}
GROUND = {"loraforge", "loraforge.errors", "loraforge.recipe", "loraforge.resources", "loraforge.redact",
          "loraforge.rundir", "loraforge.checkpoints", "loraforge.versions", "loraforge.preference_recipe",
          "loraforge.recipe_rules"}
LAYERS = ["plan", "model", "data", "use", "run", "launch"]  # bottom to top, above the ground
TOP = {"loraforge.cli", "loraforge.train", "loraforge.console", "loraforge.__main__"}
MAX_LINES = 60
LONG_FUNCTIONS = {  # function -> why it may be longer than MAX_LINES
}


def layer(module: str) -> int:
    if module in GROUND:
        return 0
    if module in TOP:
        return len(LAYERS) + 1
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1]) + 1
    raise AssertionError(f"{module}: in no layer; add it to tests/test_layout.py's picture (and the README's)")


def module_files() -> dict[str, Path]:
    out = {}
    for p in (SRC / "loraforge").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = module_files()


def _imports(tree: ast.AST):
    """[(imported loraforge module, line, at module top)], and whether the module's top imports a heavy library."""
    found, heavy = [], False

    def visit(node, top: bool):
        nonlocal heavy
        for ch in ast.iter_child_nodes(node):
            inner = top and not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.ImportFrom):
                mod = ch.module or ""
                if ch.level:
                    found.append(("<relative>", ch.lineno, top))
                elif mod == "loraforge" or mod.startswith("loraforge."):
                    for alias in ch.names:
                        sub = f"{mod}.{alias.name}"
                        found.append((sub if sub in MODULES else mod, ch.lineno, top))
                elif top and mod.split(".")[0] in HEAVY_LIBS:
                    heavy = True
            elif isinstance(ch, ast.Import):
                for alias in ch.names:
                    if alias.name.startswith("loraforge"):
                        found.append((alias.name, ch.lineno, top))
                    elif top and alias.name.split(".")[0] in HEAVY_LIBS:
                        heavy = True
            visit(ch, inner)

    visit(tree, True)
    return found, heavy


@pytest.fixture(scope="module")
def graph():
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}
    imports, heavy = {}, set()
    for m, tree in trees.items():
        imports[m], is_heavy = _imports(tree)
        if is_heavy:
            heavy.add(m)
    changed = True
    while changed:  # heavy through a top-level import of a heavy loraforge module
        changed = False
        for m, imps in imports.items():
            if m not in heavy and any(top and target in heavy for target, _, top in imps):
                heavy.add(m)
                changed = True
    return imports, heavy, trees


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles(graph):
    imports, _, _ = graph
    edges = {m: {t for t, _, _ in imps if t in MODULES and t != m and not m.startswith(t + ".") and t != "loraforge"}
             for m, imps in imports.items()}
    assert cycles(edges) == []


def test_imports_point_down_only(graph):
    imports, _, _ = graph
    upward = [f"{m}:{line} imports {t} (layer {layer(t)} above {layer(m)})"
              for m, imps in imports.items() for t, line, _ in imps if t in MODULES and layer(t) > layer(m)]
    assert upward == []


def test_no_relative_imports(graph):
    imports, _, _ = graph
    assert [f"{m}:{line}" for m, imps in imports.items() for t, line, _ in imps if t == "<relative>"] == []


def test_loraforge_modules_are_imported_at_the_top_unless_heavy(graph):
    imports, heavy, _ = graph
    lazy = [f"{m}:{line} imports {t} inside a function, and {t} is light (import it at the top)"
            for m, imps in imports.items() for t, line, top in imps if not top and t in MODULES and t not in heavy]
    assert lazy == []


def test_plan_modules_import_no_heavy_library(graph):
    """plan/ is pure: its modules import torch & co. only inside the functions that measure (flops, hardware)."""
    _, heavy, _ = graph
    assert sorted(m for m in heavy if m.startswith("loraforge.plan")) == []


def test_no_function_is_longer_than_60_lines(graph):
    _, _, trees = graph
    long = {}
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long[f"{m}.{node.name}"] = n
    over = {k: v for k, v in long.items() if k not in LONG_FUNCTIONS}
    assert over == {}, "split these into named steps (or list one in LONG_FUNCTIONS with the reason)"
    assert sorted(k for k in LONG_FUNCTIONS if k not in long) == []  # no stale exceptions


def test_the_readme_names_every_subpackage_and_module():
    """README's "How the pieces fit" lists every subpackage and module of src/loraforge with its job."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## How the pieces fit"):]
    section = section[: section.index("\n## ", 5)]
    missing = []
    for m, p in MODULES.items():
        if m == "loraforge" or p.name == "__main__.py":
            continue
        rel = p.relative_to(SRC / "loraforge")
        name = f"{rel.parent.as_posix()}/" if p.name == "__init__.py" else p.name
        if f"`{name}`" not in section:
            missing.append(rel.as_posix())
    assert missing == []
