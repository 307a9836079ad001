"""Quantized bases (QLoRA 4-bit, LLM.int8 8-bit) with bitsandbytes: on GPUs and on the CPU alike.

- `backend_problem()`: whether bitsandbytes has a backend for a device of this machine, decided by
  bitsandbytes' own list (`bitsandbytes.supported_torch_devices`, through transformers'
  `validate_bnb_backend_availability`), never by "is there CUDA". bitsandbytes >= 0.48 runs 4-bit NF4/FP4
  and 8-bit on the CPU.
- `bnb_config()`: the transformers `BitsAndBytesConfig` of a recipe's quantization section.
- `adapter_dtype()`: which dtype the LoRA weights of a quantized base train in (a pure decision).
  trl's SFTTrainer casts every trainable parameter of a quantized model to bf16 (sft_trainer.py, "When
  using QLoRA ..."); `keep_adapter_dtype()` undoes that where the plan says fp32.
- `optimizer_fallback()`: bitsandbytes' paged/8-bit optimizers on a device it has no optimizer kernels for.
- `silence_cpu_kernel_notice()`: see its docstring.
"""

from __future__ import annotations

import contextlib
import logging

from loraforge.errors import UserError

log = logging.getLogger("loraforge")

# bitsandbytes logs this from bitsandbytes/backends/cpu/ops.py when importing on a CPU with AVX512-BF16
CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
CPU_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def backend_problem(mode: str) -> str | None:
    """None if a quantized base can load here; else one line saying why and what to install."""
    if mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return (f"quantization.mode: {mode} needs bitsandbytes ({e}); install it with `pip install 'bitsandbytes>=0.48'` "
                "(CPU and CUDA builds are one wheel), or set quantization.mode: none")
    from transformers.integrations import validate_bnb_backend_availability
    from transformers.utils import get_available_devices

    if not validate_bnb_backend_availability(raise_exception=False):
        import bitsandbytes as bnb

        return (f"quantization.mode: {mode}: the installed bitsandbytes {bnb.__version__} supports "
                f"{sorted(getattr(bnb, 'supported_torch_devices', ()))} but this machine has "
                f"{sorted(get_available_devices())}; install bitsandbytes >= 0.48 (CPU backend) or set quantization.mode: none")
    return None


def compute_dtype_of(q, model_dtype: str) -> str:
    """The dtype 4-bit matmuls compute in: the recipe's, or the model's (auto)."""
    return model_dtype if q.compute_dtype == "auto" else q.compute_dtype


def bnb_config(q, model_dtype: str, quant_storage: str | None = None):
    """The BitsAndBytesConfig for `q` (a recipe QuantizationSection), or None for mode none."""
    if q.mode == "none":
        return None
    problem = backend_problem(q.mode)
    if problem:
        raise UserError(problem)
    silence_cpu_kernel_notice()
    import torch
    from transformers import BitsAndBytesConfig

    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype_of(q, model_dtype)),
        # FSDP shards flat tensors of one dtype: store the 4-bit weights in the compute dtype (FSDP+QLoRA).
        bnb_4bit_quant_storage=getattr(torch, quant_storage) if quant_storage else torch.uint8,
    )


def adapter_dtype(quant_mode: str, precision_label: str) -> str:
    """The dtype LoRA weights train in over a quantized base: bf16 when the run trains in bf16 (the QLoRA
    paper's choice, and trl's), fp32 otherwise: the CPU (fp32, no autocast; bf16 there is slow without
    AMX and loses the small updates) and fp16 GPUs (the fp16 grad scaler needs fp32 master weights).
    Over an unquantized base peft keeps adapters in fp32 and autocast computes in bf16/fp16."""
    return "bfloat16" if quant_mode != "none" and precision_label == "bf16" else "float32"


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


@contextlib.contextmanager
def keep_adapter_dtype(model, dtype: str):
    """Around SFTTrainer.__init__: where `dtype` is float32, put back the trainable tensors trl cast to bf16
    (the very tensors, so the LoRA initialisation is not rounded through bf16)."""
    import torch

    keep = is_quantized(model) and dtype == "float32"
    saved = {n: p.data for n, p in model.named_parameters() if p.requires_grad} if keep else {}
    yield
    if keep:
        for n, p in model.named_parameters():
            if n in saved and p.data is not saved[n]:
                p.data = saved[n].to(torch.float32) if saved[n].dtype != torch.float32 else saved[n]


def optimizer_fallback(optimizer: str, device: str) -> tuple[str, str | None]:
    """(optimizer to use, note or None). bitsandbytes' 8-bit and paged optimizers: paged memory is CUDA
    unified memory (no meaning on the CPU); the 8-bit states need bitsandbytes' optimizer kernels for the
    device. Anything that cannot run falls back to torch's AdamW with one line saying so."""
    if optimizer not in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") or device == "cuda":
        return optimizer, None
    if _bnb_optimizer_runs(optimizer):
        return optimizer, None
    return "adamw_torch", (f"training.optimizer: {optimizer} has no bitsandbytes kernel on the {device}; "
                           "using adamw_torch (same update, fp32 states)")


def _bnb_optimizer_runs(optimizer: str) -> bool:
    """Try one step of the bitsandbytes optimizer on a tiny CPU tensor (cached)."""
    if optimizer in _RUNS:
        return _RUNS[optimizer]
    ok = False
    try:
        import bitsandbytes as bnb
        import torch

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[optimizer]
        p = torch.nn.Parameter(torch.randn(4096))  # 8-bit states only above 4096 elements
        opt = cls([p], lr=1e-3, min_8bit_size=1) if "8bit" in optimizer else cls([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        ok = bool(torch.isfinite(p).all() and not torch.equal(before, p.detach()))
    except Exception:  # noqa: BLE001 - any failure means "does not run here"
        ok = False
    _RUNS[optimizer] = ok
    return ok


_RUNS: dict[str, bool] = {}


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CPU_KERNEL_NOTICE not in record.getMessage()


def silence_cpu_kernel_notice() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
    'kernels'" warning. On CPUs with AVX512-BF16 bitsandbytes tries to fetch an optional fused 4-bit GEMV
    from the Hugging Face Hub (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`): a
    download at run time, so never available offline, and used only by `gemv_4bit` (bf16 inputs, 1 token
    at a time: generation); without it bitsandbytes uses its own compiled CPU kernel. Training never
    reaches it. Idempotent; must run before bitsandbytes is first imported."""
    logger = logging.getLogger(CPU_KERNEL_LOGGER)
    if not any(isinstance(f, _DropKernelNotice) for f in logger.filters):
        logger.addFilter(_DropKernelNotice())


def training_ready(model) -> None:
    """A quantized base about to train: keep bitsandbytes' 4-bit layers on the autograd path in eval mode too.
    On CPUs with AVX512-BF16, a Linear4bit in eval mode repacks its weight for a bf16 inference kernel the
    first time it sees an input without grad (an evaluation during training, the sample answers): the
    activations are then rounded to bf16, and later training steps take that inference-only path. Off here,
    so that eval during a run computes as training does."""
    if not is_quantized(model):
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def describe(q) -> str:
    """'4-bit nf4 (double quant)' / '8-bit LLM.int8' for messages."""
    if q.mode == "8bit":
        return "8-bit LLM.int8"
    return f"4-bit {q.quant_type}{' (double quant)' if q.double_quant else ''}"


def full_precision_bytes(model_dir: str) -> int | None:
    """Bytes of the base in float32 (what a merge holds in RAM), from its safetensors headers; None if unknown."""
    from pathlib import Path

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total * 4




def check_lora_init(init: str, quantized: bool) -> None:
    """Refuse, in one line, an initialisation loraforge cannot carry through train -> eval -> merge."""
    if init == "pissa" and quantized:
        raise UserError(
            "lora.init: pissa needs a full-precision base (peft computes the SVD of the unquantized weight and "
            "refuses a 4-bit/8-bit one); use quantization.mode: none, or lora.init: olora over a quantized base"
        )
    if init == "loftq":
        raise UserError(
            "lora.init: loftq is not offered: its adapter corrects the quantization error of the very 4-bit weights "
            "it was fitted to, so merging it into the full-precision base (as loraforge merge/export do) would count "
            "that error twice; use lora.init: olora (works over a 4-bit base) or default"
        )


def loaded_bytes(model) -> dict[str, int]:
    """What a loaded (quantized) model really holds, by storage, each tensor counted once:
    `base_weights` = the packed 4-bit / int8 weights of the linear layers + every other parameter and buffer;
    `quant_constants` = bitsandbytes' quantization state (4-bit: absmax, nested absmax, code tables, offsets;
    8-bit: the per-row scales SCB). The memory model's `base_weights` and `quant_constants` are checked
    against these (tests/test_qlora.py)."""
    import torch

    seen: set[int] = set()

    def size(t) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    weights = qconst = 0
    for p in model.parameters():
        weights += size(p)
    for b in model.buffers():
        weights += size(b)
    for m in model.modules():
        w = getattr(m, "weight", None)
        state = getattr(w, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                qconst += size(t)
            nested = getattr(state, "state2", None)
            if nested is not None:
                qconst += size(nested.absmax) + size(nested.code)
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(m, "state", None), "SCB", None)
        qconst += size(scb)
    return {"base_weights": weights, "quant_constants": qconst}

