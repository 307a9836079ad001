"""Use a result: load base + adapter (or a merged model), generate, chat, merge."""

from __future__ import annotations

import logging
from pathlib import Path

from loraforge.checkpoints import verify_dir
from loraforge.errors import UserError
from loraforge.model.modeling import base_model_dir
from loraforge.model.quant import bnb_config, describe, full_precision_bytes
from loraforge.recipe import load_recipe
from loraforge.rundir import ADAPTER_CONFIG_FILE, RECIPE_FILE, SOURCE_FILE, read_json

log = logging.getLogger("loraforge")


def is_run_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file()


def _load_run_recipe(run_dir: Path):
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise UserError(f"{run_dir}: no recipe.yaml; is this a loraforge run directory?")
    recipe = load_recipe(recipe_file)
    source = run_dir / SOURCE_FILE
    origin = read_json(source, {}).get("recipe")
    if origin:  # resolve relative paths against the original recipe's location
        recipe._source = Path(origin)
    return recipe


def load_for_inference(path: str | Path, device: str | None = None, full_precision: bool = False):
    """(model, tokenizer) from a run directory (base + adapter) or a merged model directory.

    The base of a QLoRA / 8-bit run loads as the run trained it (same bitsandbytes config), so a run that
    trained on a card can be evaluated and chatted with on that card; `full_precision` reloads it unquantized
    instead (merge and export: the adapter is folded into the original weights, never into dequantized ones)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give a run directory or a merged model directory")

    verify_dir(path)  # a truncated or altered adapter/model file: one line, not a SafetensorError
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    quantized = False
    if is_run_dir(path):
        from peft import PeftModel

        recipe = _load_run_recipe(path)
        kwargs = {}
        if recipe.quantization.mode != "none" and not full_precision:
            kwargs = {"quantization_config": bnb_config(recipe.quantization, str(dtype).removeprefix("torch.")),
                      "device_map": {"": device}}
            quantized = True
            log.info("loading the base in %s as the run trained it", describe(recipe.quantization))
        base = AutoModelForCausalLM.from_pretrained(
            base_model_dir(recipe),
            dtype=dtype,
            trust_remote_code=recipe.model.trust_remote_code,
            revision=recipe.model.revision,
            use_safetensors=True,
            **kwargs,
        )
        model = PeftModel.from_pretrained(base, str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise UserError(f"{path}: neither a run directory (adapter_config.json) nor a model (config.json)")
    if not quantized:  # a quantized model is placed by its device_map (bitsandbytes refuses .to for 8-bit)
        model.to(device)
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """One assistant reply to `messages`, greedy unless temperature > 0."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 128, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate(model, tokenizer, messages, max_new_tokens)


def merge(run_dir: str | Path, out: str | Path) -> Path:
    """Fold the adapter into the base weights and write a standalone model + tokenizer."""
    run_dir, out = Path(run_dir), Path(out)
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: no adapter_config.json; give a run directory written by `loraforge train`")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new --out directory")
    import torch

    note_full_precision_reload(run_dir)
    model, tokenizer = load_for_inference(run_dir, device="cpu", full_precision=True)
    merged = model.merge_and_unload()
    merged.to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def note_full_precision_reload(run_dir: Path) -> None:
    """Merging a QLoRA / 8-bit run reloads its base unquantized: say so, and how much memory that takes."""
    if not is_run_dir(Path(run_dir)):
        return
    recipe = _load_run_recipe(Path(run_dir))
    if recipe.quantization.mode == "none":
        return

    need = full_precision_bytes(base_model_dir(recipe))
    size = f"about {need / 2**30:.1f} GiB of RAM" if need else "4 bytes per parameter of RAM"
    log.info("the run trained on a %s base; merging reloads the base in full precision (float32, CPU: %s), "
             "and folds the adapter into the original weights, not into dequantized ones",
             describe(recipe.quantization), size)
