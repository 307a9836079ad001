"""How far from the hardware limit: model FLOPs of a LoRA step per real token, and the device's peak.

Model FLOPs per real (non-padding) token of one LoRA training step, from the architecture alone:
- every frozen linear layer, the LM head included: forward 2·n and backward to its input 2·n FLOPs for
  n weights (no weight gradient: the base is frozen);
- the LoRA adapters: forward, input gradient and weight gradient, 2·m each for m adapter weights;
- attention: QKᵀ and AV cost 4·d FLOPs per layer per token per position attended (d = heads x head_dim),
  a causal token at position t attends t + 1 positions; the backward costs twice the forward.
Padding and recomputation (gradient checkpointing) are not model FLOPs: MFU = model FLOPs per token x
real tokens per second / peak FLOP/s, so wasted work shows as lower MFU.

The peak: on a GPU the dense bf16/fp16 tensor-core figure (FP32 accumulate) of its datasheet; on the CPU it is measured,
the best of a few fp32 matrix multiplications on all threads (the CPU trains in fp32), over several
rounds right after the run and kept as the best this process ever measured (a peak is a maximum: a
measurement at a busy moment can only be too low). An MFU above 100% cannot be true: it means the peak
was measured while other work held the cores, so it is not reported; the summary says the peak is
uncertain instead (`checked_mfu`).
"""

from __future__ import annotations

import re
import time

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s with FP32 accumulation, as training runs (GeForce
# cards run FP32-accumulate at half their FP16-accumulate rate: RTX 3060 = 28 SMs x 4 tensor cores x 128 FLOP/clk
# x 1.777 GHz = 25.5, not the 51 of the FP16-accumulate line). Matched as whole words, most specific first, so
# "L40S" is not "L40" and "H100 PCIe" is not the SXM part; names not here fall back to trl's table.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100", 312.0), ("A6000", 154.8), ("A10G", 125.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("V100", 125.0), ("T4", 65.0),  # fp16 (no bf16 before Ampere)
    ("4090", 165.2), ("4080", 97.5),
    ("3090 Ti", 80.0), ("3090", 71.2), ("3080 Ti", 68.2), ("3080", 59.5), ("3070", 40.6),
    ("3060 Ti", 32.4), ("3060", 25.5),
)


def _matches(fragment: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(fragment.casefold())}(?![\w])", name.casefold()) is not None


def mean_attended(lengths: list[int]) -> float:
    """Positions a token attends to, on average over all tokens of causal samples of these lengths."""
    tokens = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / tokens if tokens else 0.0


def lora_step_flops_per_token(shape, lora_r: int, targets, lengths: list[int]) -> float:
    """Model FLOPs of one LoRA training step per real token (see the module docstring)."""
    frozen = shape.layers * shape.linear_params_per_layer + shape.vocab * shape.hidden  # decoder linears + head
    adapters = shape.lora_params(lora_r, targets)
    attn_fwd = shape.layers * 4 * shape.heads * shape.head_dim * mean_attended(lengths)
    return 4.0 * frozen + 6.0 * adapters + 3.0 * attn_fwd


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 2) -> float:
    """FLOP/s of the best of `repeats` fp32 n x n matrix multiplications, on torch's threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


_best_cpu_peak = 0.0


def robust_cpu_peak(rounds: int = 3, pause_s: float = 0.05, measure=None) -> float:
    """The best of `rounds` short measurements (a pause between them lets a burst of other work pass), and
    of every earlier one in this process."""
    global _best_cpu_peak
    measure = measure or measure_cpu_matmul_peak
    for i in range(rounds):
        if i:
            time.sleep(pause_s)
        _best_cpu_peak = max(_best_cpu_peak, measure())
    return _best_cpu_peak


def checked_mfu(tokens_per_second, flops_per_token, peak, devices: int, source: str) -> tuple[float | None, str]:
    """(MFU, peak source); above 100% the measured peak was too low (a busy machine): no MFU, and the source
    says the peak is uncertain and by how much the run beat it."""
    value = mfu(tokens_per_second, flops_per_token, peak, devices)
    if value is not None and value > 1.0:
        return None, (f"{source}; uncertain: the run did {100 * value:.0f}% of it, so the peak was measured "
                      "while other work held the cores (MFU not reported)")
    return value, source


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16/fp16 (FP32-accumulate) peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name), or None."""
    tflops = next((v for k, v in GPU_PEAK_TFLOPS if _matches(k, name)), None)
    if tflops is not None:
        return tflops * 1e12
    try:  # trl keeps a table too (TorchTitan's figures: B200, GB200, MI300X, ...)
        from trl.trainer.utils import get_peak_flops
    except ImportError:
        return None
    return get_peak_flops(name, "bfloat16") or get_peak_flops(name, "float16")


def device_peak(hw) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if hw.kind == "cuda" and hw.gpus:
        peak = gpu_peak_flops(hw.gpus[0].name)
        return peak, f"{hw.gpus[0].name} dense bf16/fp16 datasheet peak" if peak else "unknown GPU"
    return robust_cpu_peak(), "measured fp32 matmul peak of this CPU (all threads, best of 3 rounds)"


def mfu(tokens_per_second: float | None, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    if not tokens_per_second or not peak:
        return None
    return flops_per_token * tokens_per_second / (peak * max(1, devices))
