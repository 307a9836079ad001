"""Trace one real LoRA/QLoRA training step of a real-size architecture under torch's FakeTensorMode.

Nothing is allocated: the model is built on the meta device, LoRA is added by the same code the trainer uses
(`modeling.add_lora`), every parameter is swapped for a fake CPU tensor, and then two optimizer steps
(forward + backward + clip + AdamW, so the optimizer state exists in the second) run exactly as the trainer
runs them: autocast in the trainer's precision, trl's fused LM head, activation checkpointing, peft's and
trl's dtype choices for the adapter. A TorchDispatchMode records every tensor storage that comes to life and
the weak-reference callback of each one when it dies, so the peak of live tensor bytes is exact for the ops
that ran, by category.

Where fake CPU tensors would differ from a CUDA run, the trace does what CUDA does:

* dropout: CPU's dropout keeps a full-width noise tensor; CUDA's fused kernel keeps a 1-byte mask. The trace
  routes `F.dropout` through `aten.native_dropout` (the CUDA path).
* 4-bit weights: `Params4bit` cannot wrap a fake tensor; each 4-bit weight is quantized with
  `bitsandbytes.functional.quantize_4bit` (fake in, fake out) and kept with its quant state. For more than 1536
  tokens bitsandbytes' CUDA `gemm_4bit` dequantises the weight into a temporary and calls `F.linear`; the fake
  kernel hides that temporary, so the trace adds it as a transient allocation.
* trl's fused LM head: on CUDA its per-tile fold is a Triton kernel writing in place; on the CPU it is torch
  ops with full-tile temporaries. The trace replaces the CPU fold with an in-place no-op (the CUDA memory
  behaviour).
* the attention mask: a real batch of one sequence (or of equal lengths) has no padding, and transformers then
  skips the (B, 1, S, S) mask; fake inputs cannot be inspected, so the trace passes a mask only where the real
  run has padding (micro-batch > 1 without packing).

What the trace cannot see: the CUDA context, the caching allocator's rounding and fragmentation, cuBLAS/cuDNN
workspaces and NCCL buffers. memory.py covers those with explicit terms and a margin.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field

from loraforge.model.modeling import add_lora
from loraforge.model.quant import adapter_dtype
from loraforge.plan.memory import ModelShape, TrainSetup
from loraforge.recipe import LoraSection

GIB = 2**30
_CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block; every allocation is rounded up to it

CATEGORIES = ("weights", "quant_state", "lora_params", "gradients", "optimizer", "activations", "reference", "backward",
              "optimizer_step")


@dataclass
class TraceResult:
    peak_bytes: int
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict:
        return {
            "peak_gib": round(self.peak_gib, 4),
            "at_peak_gib": {k: round(v / GIB, 4) for k, v in self.at_peak.items() if v},
            "phase_peaks_gib": {k: round(v / GIB, 4) for k, v in self.phase_peaks.items()},
            "seconds": round(self.seconds, 1),
        }


class LiveBytes:
    """Live tensor bytes by category, from creation (dispatch) to death (storage weakref callback)."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        self.info = WeakIdKeyDictionary()  # storage -> [nbytes, category, weakref]
        self.by_cat = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.at_peak: dict[str, int] = dict(self.by_cat)
        self.phase = "activations"
        self.phase_peaks: dict[str, int] = {}

    def _storages(self, t):
        from torch.distributed._tools.common_utils import get_untyped_storages

        return get_untyped_storages(t)

    def track(self, t, category: str | None = None) -> None:
        cat = category or self.phase
        for st in self._storages(t):
            rec = self.info.get(st)
            if rec is not None:
                if category is not None and rec[1] != category:
                    self.by_cat[rec[1]] -= rec[0]
                    self.by_cat[category] += rec[0]
                    rec[1] = category
                continue
            nbytes = st.nbytes()
            if nbytes:
                nbytes = math.ceil(nbytes / _CUDA_BLOCK) * _CUDA_BLOCK
            rec = [nbytes, cat, None]
            rec[2] = weakref.ref(st, lambda _w, rec=rec: self._free(rec))
            self.info[st] = rec
            self.by_cat[cat] += nbytes
            self.total += nbytes
        self.update_peak()

    def _free(self, rec) -> None:
        self.by_cat[rec[1]] -= rec[0]
        self.total -= rec[0]

    def update_peak(self, transient: int = 0) -> None:
        now = self.total + transient
        if now > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = now
        if now > self.peak:
            self.peak = now
            self.at_peak = dict(self.by_cat)
            if transient:
                self.at_peak[self.phase] += transient


def _dispatch_mode(live: LiveBytes, fourbit_min_tokens: int):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    gemm_4bit = None
    try:
        gemm_4bit = torch.ops.bitsandbytes.gemm_4bit.default
    except (AttributeError, RuntimeError):
        pass

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if gemm_4bit is not None and func is gemm_4bit:
                a, shape_b = args[0], args[2]
                tokens = a.numel() // a.shape[-1]
                if tokens > fourbit_min_tokens:  # CUDA dequantises the weight into a temporary first
                    live.update_peak(transient=math.prod(shape_b) * a.element_size())
            out = func(*args, **kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    live.track(t)
            return out

    return Mode()


@contextlib.contextmanager
def _cuda_like_dropout():
    """F.dropout through aten.native_dropout, which keeps a bool mask as CUDA's fused kernel does.

    Patched on the module (not a TorchFunctionMode) so that checkpoint recomputation sees it too."""
    import torch
    import torch.nn.functional as F

    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1:
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return input

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


@contextlib.contextmanager
def _cuda_like_fused_head():
    """trl's fused LM head, with its CPU per-tile fold replaced by an in-place no-op (Triton on CUDA)."""
    from trl.kernels import chunked_logprob as ck

    saved = ck._forward_tile, ck._backward_tile, ck._addmm_fp32

    def noop(*args, **kwargs):
        return None

    ck._forward_tile = ck._backward_tile = ck._addmm_fp32 = noop
    try:
        yield
    finally:
        ck._forward_tile, ck._backward_tile, ck._addmm_fp32 = saved


@contextlib.contextmanager
def _real_run_masks(packing: bool):
    """transformers looks for packed sequences in the position ids; it cannot read fake ones, so it assumes packing
    and builds a (B, 1, S, S) mask. A real unpacked batch has contiguous positions and no such mask."""
    from transformers import masking_utils

    saved = masking_utils.find_packed_sequence_indices
    if not packing:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = saved


def _lora_for(setup: TrainSetup) -> LoraSection:
    """The LoRA settings the traced step trains with (alpha 2r, as the recipes' default)."""
    targets = setup.lora_targets if isinstance(setup.lora_targets, str) else list(setup.lora_targets)
    return LoraSection(r=setup.lora_r, alpha=2 * setup.lora_r, dropout=setup.lora_dropout, target_modules=targets)


def _to_4bit(model, compute_dtype, double_quant: bool) -> None:
    """Swap every nn.Linear but the output head for a bitsandbytes Linear4bit, as transformers' quantizer does."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4", device="meta",
                )
                new.requires_grad_(False)
                setattr(module, child_name, new)
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {"load_in_4bit": True, "quant_method": "bitsandbytes"}


def _fake_parameters(model, fake_mode, live: LiveBytes, double_quant: bool) -> None:
    """Swap every meta parameter / buffer for a fake CPU tensor (memoised, so tied weights stay tied)."""
    import torch
    from bitsandbytes import functional as bnbf
    from bitsandbytes.functional import quantize_4bit

    if "dynamic" not in bnbf.name2qmap:  # built from real values with .tolist(); build it outside the fake mode
        bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map()
    memo: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in memo:
                module._parameters[name] = memo[id(p)]
                continue
            with fake_mode:
                if type(p).__name__ == "Params4bit":
                    w = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16, device="cpu")
                    packed, state = quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
                    new = torch.nn.Parameter(packed, requires_grad=False)
                    new.quant_state = state
                    live.track(packed, "weights")
                    for t in _quant_tensors(state):
                        live.track(t, "quant_state")
                else:
                    new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad)
                    live.track(new, "lora_params" if p.requires_grad else "weights")
            memo[id(p)] = new
            module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            if b is not None:
                with fake_mode:
                    nb = torch.empty(b.shape, dtype=b.dtype, device="cpu")
                live.track(nb, "weights")
                module._buffers[name] = nb
    # rotary embeddings keep a copy of their inverse frequencies as a plain attribute
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "inv_freq"):
            module.original_inv_freq = module.inv_freq


def _quant_tensors(state):
    import torch

    out = [v for v in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(v, torch.Tensor)]
    if getattr(state, "state2", None) is not None:
        out += [v for v in (state.state2.absmax, state.state2.code) if isinstance(v, torch.Tensor)]
    return out


def build_config(shape: ModelShape):
    """A transformers config of the architecture (no hub access)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, **shape.config_kwargs())


def trace_step(shape: ModelShape, setup: TrainSetup, steps: int = 2) -> TraceResult:
    """Peak live tensor bytes of `steps` optimizer steps of `setup` on the architecture `shape`."""
    check_traceable(setup)
    t0 = time.time()
    live = LiveBytes()
    model = _trainer_model(shape, setup, torch_dtype(setup))
    fake_mode, trainable, optimizer = fake_training_state(model, setup, live)
    batch = _fake_batch(setup, fake_mode, live)
    _run_steps(model, optimizer, trainable, batch, setup, fake_mode, live, steps)
    del model, optimizer
    return TraceResult(live.peak, live.at_peak, dict(live.phase_peaks), time.time() - t0)


def torch_dtype(setup: TrainSetup):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setup.precision]


def fake_training_state(model, setup: TrainSetup, live: LiveBytes):
    """Every parameter of `model` swapped for a fake CPU tensor, gradients counted as they accumulate, torch's
    AdamW over the trainable ones: (fake mode, trainable parameters, optimizer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(model, fake_mode, live, setup.double_quant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.register_post_accumulate_grad_hook(lambda p: live.track(p.grad, "gradients"))
    return fake_mode, trainable, _adamw(setup, trainable, fake_mode)


@contextlib.contextmanager
def cuda_like(setup: TrainSetup, fake_mode, live: LiveBytes):
    """The fake mode, the counting dispatch mode and the trace's CUDA corrections (module docstring)."""
    mode = _dispatch_mode(live, fourbit_min_tokens=1536)
    with fake_mode, mode, _cuda_like_dropout(), _cuda_like_fused_head(), _real_run_masks(setup.packing):
        yield


def autocast(setup: TrainSetup):
    """The trainer's autocast (bf16 / fp16), or none for fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch_dtype(setup)) if setup.precision != "fp32" else contextlib.nullcontext()


def optimizer_step(optimizer, trainable: list, live: LiveBytes) -> None:
    """Gradient clipping and AdamW as the trainer runs them; the optimizer state counted once it exists."""
    import torch

    live.phase = "optimizer_step"
    torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
    optimizer.step()
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                live.track(v, "optimizer")
    optimizer.zero_grad(set_to_none=True)


def check_traceable(setup: TrainSetup) -> None:
    if setup.world_size != 1 or setup.strategy not in ("single", "ddp"):
        raise ValueError("the trace runs one process; trace a single-device setup")
    if setup.quant == "8bit":
        raise ValueError("the trace supports quantization none and 4bit")
    if setup.optimizer not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError("the trace steps torch's AdamW (adamw_torch / adamw_torch_fused)")


def lora_model(shape: ModelShape, setup: TrainSetup, dtype):
    """The model the trainer is given, on the meta device: the architecture (4-bit linears for QLoRA) and LoRA
    added by the trainer's own code (prepare_model_for_kbit_training for QLoRA + get_peft_model)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(shape)
    with torch.device("meta"):
        attn = "eager" if shape.eager_only else setup.attn  # e.g. Gemma-2: transformers has no SDPA path
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        model.config.use_cache = False
        if setup.quant == "4bit":
            _to_4bit(model, dtype, setup.double_quant)
        model, _, _ = add_lora(model, _lora_for(setup), setup.quant, setup.gradient_checkpointing)
    return model


def trl_ready(model, setup: TrainSetup, head_outputs: tuple[str, ...]):
    """What trl's trainers (SFTTrainer, DPOTrainer: trl 1.16) and transformers' Trainer do to the PeftModel they
    are given: input gradients for checkpointing, QLoRA adapters in bf16 where the run trains in bf16, the fused
    LM head with `head_outputs`, activation checkpointing, train mode."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    if setup.gradient_checkpointing:
        model.enable_input_require_grads()
    if adapter_dtype(setup.quant, setup.precision) == "bfloat16":  # trl's cast, kept where the run trains in bf16
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_magnitude_vector" not in name:
                p.data = p.data.to(torch.bfloat16)
    add_fused_lm_head(model.get_base_model(), outputs=head_outputs)
    if setup.gradient_checkpointing:  # what Trainer does with activation_checkpointing=True
        model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _trainer_model(shape: ModelShape, setup: TrainSetup, dtype):
    """The model as the SFT trainer trains it (trl 1.16, sft_trainer.py)."""
    return trl_ready(lora_model(shape, setup, dtype), setup, ("log_probs", "entropy", "is_top1"))


def _fake_batch(setup: TrainSetup, fake_mode, live: LiveBytes) -> tuple:
    """(input ids, labels, attention mask or None) of one micro-batch, as fake tensors counted as activations."""
    import torch

    b, s = setup.micro_batch, setup.seq_len
    with fake_mode:
        input_ids = torch.zeros(b, s, dtype=torch.long, device="cpu")
        labels = torch.zeros(b, s, dtype=torch.long, device="cpu")
        mask = torch.ones(b, s, dtype=torch.long, device="cpu") if setup.padded else None
    for t in (input_ids, labels) + ((mask,) if mask is not None else ()):
        live.track(t, "activations")
    return input_ids, labels, mask


def _adamw(setup: TrainSetup, trainable: list, fake_mode):
    """torch's AdamW as the trainer makes it: fused, or foreach (torch's default on CUDA)."""
    import torch

    opt_kwargs = {"lr": 1e-4, "weight_decay": 0.0}
    if setup.optimizer == "adamw_torch_fused":
        opt_kwargs["fused"] = True
    else:
        opt_kwargs["foreach"] = True  # torch's default on CUDA
    with fake_mode:
        return torch.optim.AdamW(trainable, **opt_kwargs)


def _run_steps(model, optimizer, trainable: list, batch: tuple, setup: TrainSetup, fake_mode, live: LiveBytes,
               steps: int) -> None:
    """`steps` optimizer steps as the trainer runs them (autocast forward with trl's fused head, backward, gradient
    clipping, AdamW), every storage counted by phase; the optimizer state is counted once it exists."""
    input_ids, labels, mask = batch
    with cuda_like(setup, fake_mode, live):
        for _ in range(steps):
            live.phase = "activations"
            with autocast(setup):
                out = model(input_ids=input_ids, labels=labels, attention_mask=mask, fused_lm_head=True)
            loss = out.loss
            del out
            live.phase = "backward"
            loss.backward()
            del loss
            optimizer_step(optimizer, trainable, live)
