"""Peak per-device memory of one LoRA/QLoRA training step, from the model's config alone.

`ModelShape` is what the model's config.json says (read without weights, without a tokenizer, without torch);
`TrainSetup` is what the trainer will do (micro-batch, sequence, checkpointing, quantization, LoRA, optimizer,
precision, attention, world size and strategy). `estimate(shape, setup)` returns a `MemoryEstimate` whose
breakdown adds up to the predicted peak. Every term models what loraforge's trainer really runs (transformers
5 + peft + trl's SFTTrainer); trace.py checks the tensor terms against a FakeTensorMode trace of the same step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 2**30
MIB = 2**20


# --------------------------------------------------------------------------------------------------
# The model, from config.json
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    max_positions: int | None = None
    name: str = ""

    # nn.Linear layers of one decoder layer: short name -> (in_features, out_features)
    def linears(self) -> dict[str, tuple[int, int]]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, self.intermediate),
            "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Norm weights and biases: everything that is neither a decoder linear nor an embedding."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * (2 * self.hidden + bias) + self.hidden

    @property
    def total_params(self) -> int:
        emb = self.embedding_params * (1 if self.tied else 2)
        return self.layers * self.linear_params_per_layer + emb + self.other_params

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (i + o) for n, (i, o) in self.linears().items() if _targeted(n, targets))

    def config_kwargs(self) -> dict:
        """Keyword arguments for transformers' config class of this architecture (used by the trace)."""
        kw = dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tied,
            max_position_embeddings=self.max_positions or 4096,
        )
        if self.model_type == "llama":
            kw["attention_bias"] = self.qkv_bias
        return kw


def _targeted(name: str, targets) -> bool:
    return targets == "all-linear" or name in targets


SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def shape_from_config(cfg: dict, name: str = "") -> ModelShape:
    """A ModelShape from a config.json dict (Llama-family decoders: llama, qwen2, mistral)."""
    from .errors import UserError

    mt = cfg.get("model_type", "")
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        return shape_from_config(cfg["text_config"] | {"model_type": cfg["text_config"].get("model_type", mt)}, name)
    if mt not in SUPPORTED_TYPES:
        raise UserError(
            f"model config: the memory model knows {', '.join(SUPPORTED_TYPES)} architectures, not '{mt}'; "
            "set training.micro_batch_size / gradient_accumulation_steps / gradient_checkpointing by hand"
        )
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        shape = ModelShape(
            model_type=mt,
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            # transformers' defaults: Llama and Qwen2 configs untie unless told otherwise
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_positions=cfg.get("max_position_embeddings"),
            name=name,
        )
    except KeyError as e:
        raise UserError(f"model config: config.json has no {e.args[0]}; is it a causal language model?") from None
    return shape


def read_model_config(name_or_path: str, revision: str | None = None) -> dict:
    """config.json of a local directory (nothing else needed in it) or of a hub id (downloaded alone, cached)."""
    from .errors import UserError

    p = Path(name_or_path).expanduser()
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise UserError(f"model.name_or_path: {p} has no config.json")
        return json.loads(f.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "config.json", revision=revision)).read_text())
    except Exception as e:  # offline, unknown repo, gated...
        raise UserError(
            f"model.name_or_path: cannot read config.json of '{name_or_path}' ({type(e).__name__}); "
            "download it, or point name_or_path at a local directory holding it"
        ) from None


# --------------------------------------------------------------------------------------------------
# What the trainer does
# --------------------------------------------------------------------------------------------------


# The strategies of launch.py: DDP replicates; FSDP / ZeRO-3 shard the base weights (and LoRA state); ZeRO-2 shards
# gradients and optimizer state; ZeRO-3 offload keeps parameters and optimizer state in CPU memory.
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3-offload")


@dataclass(frozen=True)
class TrainSetup:
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    quant: str = "none"  # none / 4bit / 8bit
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "adamw_torch"
    precision: str = "bf16"  # bf16 / fp16 (autocast) or fp32 (no autocast: the CPU, or dtype float32)
    device: str = "cuda"  # cuda or cpu
    attn: str = "sdpa"
    packing: bool = False
    world_size: int = 1
    strategy: str = "single"

    @property
    def padded(self) -> bool:
        """A batch of several sequences is padded, so transformers builds a (B, 1, S, S) attention mask."""
        return (self.micro_batch > 1 or self.packing) and self.attn != "flash_attention_2"

    def with_(self, **kw) -> "TrainSetup":
        return replace(self, **kw)


# --------------------------------------------------------------------------------------------------
# The analytic model
# --------------------------------------------------------------------------------------------------

# trl's fused LM head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary entries
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768
# bitsandbytes' CUDA gemm_4bit dequantises the weight into a temporary above this many tokens
FOURBIT_DEQUANT_MIN_TOKENS = 1536
# Not seen by a tensor trace: CUDA context + cuBLAS workspaces (per process), NCCL buffers (per process, DDP/FSDP)
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
NCCL_BYTES = int(0.5 * GIB)
# The caching allocator rounds and fragments: a share of the tensor peak, plus a floor
MARGIN_SHARE = 0.05
MARGIN_FLOOR = int(0.25 * GIB)


@dataclass
class MemoryEstimate:
    """Predicted peak bytes per device, with a breakdown that adds up to it."""

    breakdown: dict[str, int]
    tensor_peak: int  # what a trace of live tensors can see (everything but context and margin)
    phase: str  # where the peak is: "backward" or "optimizer"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(self.breakdown.values())

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def breakdown_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.breakdown.items()}

    def to_dict(self) -> dict:
        return {
            "predicted_peak_gib": round(self.peak_gib, 3),
            "tensor_peak_gib": round(self.tensor_peak / GIB, 3),
            "peak_phase": self.phase,
            "breakdown_gib": self.breakdown_gib(),
        }


def _opt_state_bytes(optimizer: str, n: int, param_bytes: int) -> tuple[int, int]:
    """(optimizer state, transient during the step) for `n` trainable parameters of `param_bytes` each."""
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        state = 2 * n * param_bytes  # exp_avg, exp_avg_sq in the parameter's dtype
        # torch's foreach AdamW (the default on CUDA) materialises sqrt(exp_avg_sq) for all parameters at once
        return state, (0 if optimizer == "adamw_torch_fused" else n * param_bytes)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * n + 2 * (n // 256 + 1) * 4, 0  # uint8 states + blockwise absmax
    if optimizer == "paged_adamw_32bit":
        return 8 * n, 0
    if optimizer == "adafactor":
        return 4 * n, n * param_bytes  # an upper bound: factored second moments are much smaller
    return 0, 0  # sgd without momentum


def _layer_saved_per_token(shape: ModelShape, s: TrainSetup, act: int, comp: int, cuda: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token, without checkpointing."""
    h, q, kv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    lin = shape.linears()
    total = 2 * (4 * h + 4)  # two RMSNorms keep their fp32 input and 1/rms
    dropout = s.lora_dropout > 0
    shared_inputs = set()
    for name, (d_in, _) in lin.items():
        if not _targeted(name, s.lora_targets):
            continue  # a frozen linear keeps only its weight
        total += comp * s.lora_r  # lora_B keeps its (tokens x r) input
        if dropout:
            # dropout keeps its mask (1 byte on CUDA; the CPU keeps a full-width noise tensor), lora_A its input
            total += (1 if cuda else comp) * d_in + comp * d_in
        elif comp == 2:
            total += comp * d_in  # peft casts x to the adapter's fp32, autocast back to bf16: a copy per module
        else:
            group = "attn_in" if name in ("q_proj", "k_proj", "v_proj") else "mlp_in" if name in ("gate_proj", "up_proj") else name
            if group not in shared_inputs:  # fp32 without dropout: lora_A keeps x itself, shared by q/k/v, gate/up
                shared_inputs.add(group)
                total += comp * d_in
    # attention: q, k, v, the output and the log-sum-exp (flash / memory-efficient kernels)
    if s.attn == "eager":
        total += comp * (q + 2 * q + q) + (4 + comp) * shape.heads * s.seq_len
    elif s.padded:
        # a padding mask: transformers repeats k/v for the heads (no enable_gqa with a mask), and SDPA turns the
        # boolean mask into an additive one in the compute dtype per layer, which the backward keeps
        total += comp * (4 * q) + 4 * shape.heads + comp * s.seq_len
    else:
        total += comp * (2 * q + 2 * kv) + 4 * shape.heads
    # MLP: SiLU input, SiLU output and the up projection (in the residual stream's dtype)
    total += 3 * act * inter
    return total


def estimate(shape: ModelShape, s: TrainSetup) -> MemoryEstimate:
    """Peak per-device memory of one training step of `s` on the architecture `shape`."""
    notes: list[str] = []
    gpu = s.device == "cuda"
    half = s.precision in ("bf16", "fp16")
    quant = s.quant
    b, seq = s.micro_batch, s.seq_len
    tokens = b * seq
    L, h, V = shape.layers, shape.hidden, shape.vocab
    model_bytes = 2 if half else 4
    # The residual stream: bf16/fp16 for LoRA; fp32 for QLoRA (peft's prepare_model_for_kbit_training upcasts
    # norms and embeddings to fp32, so every norm output is fp32) and without autocast.
    act = 2 if (half and quant == "none") else 4
    comp = 2 if half else 4  # what autocast computes in

    # ---- weights -------------------------------------------------------------------------------
    linear_params = L * shape.linear_params_per_layer
    rest = shape.total_params - linear_params  # embeddings, norms, biases (and an untied head)
    if quant == "none":
        weights, qconst = shape.total_params * model_bytes, 0
    elif quant == "4bit":
        weights = linear_params // 2 + rest * 4  # 4-bit packed; the rest upcast to fp32 by peft
        # bitsandbytes, per linear weight: its 16-entry fp32 NF4/FP4 code and an absmax per 64 weights (fp32;
        # with double quantization uint8, plus an fp32 absmax per 256 blocks, a 256-entry fp32 code and an
        # offset). Checked against the bytes of loaded models (tests/test_qlora.py, quant.loaded_bytes).
        per_weight = [-(-i * o // 64) for i, o in shape.linears().values()]
        blocks = L * sum(per_weight)
        if s.double_quant:
            qconst = blocks + L * sum(-(-n // 256) * 4 + 1024 + 4 + 64 for n in per_weight)
        else:
            qconst = blocks * 4 + L * len(per_weight) * 64
    else:  # 8bit (LLM.int8)
        weights = linear_params + rest * 4
        qconst = L * sum(o for _, o in shape.linears().values()) * 4  # per-row scales
    # ---- LoRA, gradients, optimizer ------------------------------------------------------------
    n_lora = shape.lora_params(s.lora_r, s.lora_targets)
    # peft keeps adapters in fp32 over a bf16 base; QLoRA adapters are bf16 in a bf16 run, else fp32 (quant.adapter_dtype)
    lora_bytes = 2 if quant != "none" and s.precision == "bf16" else 4
    lora = n_lora * lora_bytes
    grads = n_lora * lora_bytes
    opt_state, opt_transient = _opt_state_bytes(s.optimizer, n_lora, lora_bytes)

    # ---- strategy --------------------------------------------------------------------------------
    world = max(1, s.world_size)
    shard = world if s.strategy in ("fsdp", "zero3", "zero3-offload") else 1
    gathered = 0
    if shard > 1:
        per_layer = shape.linear_params_per_layer * (0.5 if quant == "4bit" else 1 if quant == "8bit" else model_bytes)
        gathered = int(2 * per_layer)  # the layer being computed and the one prefetched, unsharded
        weights = weights // shard + gathered
        qconst //= shard
        lora, grads = lora // shard, grads // shard
        opt_state //= shard
        opt_transient //= shard
    if s.strategy == "zero2" and world > 1:  # gradients and optimizer state sharded, weights replicated
        grads, opt_state, opt_transient = grads // world, opt_state // world, opt_transient // world
    if s.strategy == "zero3-offload":
        weights, opt_state, opt_transient = gathered, 0, 0
        notes.append("ZeRO-3 offload: parameters and optimizer state live in CPU memory")
    ddp_buckets = grads if s.strategy == "ddp" and world > 1 else 0  # DDP's gradient buckets copy the gradients

    # ---- activations ---------------------------------------------------------------------------
    per_layer = _layer_saved_per_token(shape, s, act, comp, gpu)
    rope = 2 * shape.head_dim * act
    mask = seq if s.padded else 0  # the boolean (B, 1, S, S) mask, once
    if s.gradient_checkpointing:
        saved_layers = tokens * (L * act * h)  # each checkpointed layer keeps its input
    else:
        saved_layers = tokens * L * per_layer
    saved_layers += tokens * (rope + mask)
    # a checkpointed layer is recomputed in the backward: its saved tensors come back, then its gradients;
    # without checkpointing the top layer's gradients are the same temporaries.
    grad_temps = tokens * _layer_backward_per_token(shape, s, act, comp)
    layer_transient = grad_temps + (tokens * per_layer if s.gradient_checkpointing else 0)
    if quant == "4bit" and tokens > FOURBIT_DEQUANT_MIN_TOKENS:
        layer_transient += max(i * o for i, o in shape.linears().values()) * comp  # dequantised weight
    # ---- the fused LM head (trl): log-probs in tiles, never the full logits -----------------------
    head_in = act  # the final norm's output: fp32 in QLoRA (fp32 norm weight)
    head_saved = tokens * ((4 * h + 4) + head_in * h + 8 + 4 + 4 + 2 + 8)
    tile = min(tokens, HEAD_TOKEN_TILE) * HEAD_VOCAB_TILE * comp  # trl allocates the full tile width
    # QLoRA's fp32 head weight and fp32 hidden states are cast to the compute dtype tile by tile; in the backward
    # the previous tile's cast is still referenced while the next one is made
    cast_w = quant != "none" and half
    cast_h = head_in != comp
    w_chunk = min(V, HEAD_VOCAB_TILE) * h * comp if cast_w else 0
    h_chunk = min(tokens, HEAD_TOKEN_TILE) * h * comp if cast_h else 0
    head_fwd = tile + w_chunk + h_chunk + tokens * 7 * 4
    head_bwd = tile + tokens * h * 4 + tokens * 4 + max(
        (min(V, 2 * HEAD_VOCAB_TILE) * h * comp if cast_w else 0) + h_chunk,  # two weight tiles
        (min(tokens, 2 * HEAD_TOKEN_TILE) * h * comp if cast_h else 0) + w_chunk,  # two token tiles
        w_chunk + h_chunk + tokens * h * head_in,  # the gradient cast back at the end
    )
    if not gpu:
        # The CPU runs loraforge's plain head (trainer.add_plain_lm_head): logits of the labelled positions
        # (at most every token), saved as log-probabilities for the backward, plus the logits and their
        # gradient while it runs.
        head_saved = tokens * (head_in * h + 8 + V * 4)
        head_fwd = head_bwd = tokens * V * 4 * 2
    transient = max(head_fwd, head_bwd, layer_transient)

    static = weights + qconst + lora + grads + opt_state + ddp_buckets
    fwd_bwd = saved_layers + head_saved + transient
    if opt_transient > fwd_bwd:
        phase, tensor_peak = "optimizer", static + opt_transient
    else:
        phase, tensor_peak = "backward", static + fwd_bwd

    breakdown = {
        "base_weights": weights,
        "quant_constants": qconst,
        "lora_params": lora,
        "lora_grads": grads + ddp_buckets,
        "optimizer_state": opt_state,
    }
    if phase == "optimizer":
        breakdown["activations"] = 0
        breakdown["logits_and_loss"] = 0
        breakdown["optimizer_step"] = opt_transient
    else:
        head_part = head_saved + (transient if transient in (head_fwd, head_bwd) else 0)
        breakdown["activations"] = fwd_bwd - head_part
        breakdown["logits_and_loss"] = head_part
    if gpu:
        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0)
        breakdown["allocator_margin"] = int(MARGIN_SHARE * tensor_peak) + MARGIN_FLOOR
    else:
        breakdown["allocator_margin"] = int(MARGIN_SHARE * tensor_peak)
    return MemoryEstimate({k: int(v) for k, v in breakdown.items()}, int(tensor_peak), phase, notes)


def _layer_backward_per_token(shape: ModelShape, s: TrainSetup, act: int, comp: int) -> float:
    """Gradient temporaries while one decoder layer runs backward, per token, beyond what it keeps.

    The MLP is the widest part: the gradients of the down projection's input (base and adapter path, through
    peft's fp32 cast and dropout), of the SiLU output and of the up projection. Coefficients per element of the
    intermediate (I) and hidden (h) width, read off the op sequence and checked with trace.py:
    bf16/fp16 LoRA 10 I + 10 h with dropout, 6 I + 10 h without; QLoRA (fp32 residual) 10 I; fp32 8 I + 10 h.
    """
    inter, h = shape.intermediate, shape.hidden
    dropout = s.lora_dropout > 0 and _targeted("down_proj", s.lora_targets)
    if comp == 4:
        return 8 * inter + 10 * h
    if act == 4:
        return 10 * inter
    return (10 if dropout else 6) * inter + 10 * h


def model_shape(config: dict, name: str = "") -> ModelShape | None:
    """The shape of a config the memory model knows, else None (the planner then splits the batch only)."""
    from .errors import UserError

    try:
        return shape_from_config(config, name)
    except UserError:
        return None
