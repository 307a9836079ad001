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

from loraforge.errors import UserError
from loraforge.plan.arch import inventory

GIB = 2**30


# --------------------------------------------------------------------------------------------------
# The model, from config.json
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The parameter inventory of a decoder-only causal LM (arch.py reads it from config.json). The defaults are a
    Llama layer: q/k/v/o + gate/up/down, two RMSNorms, full causal attention."""

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
    # nn.Linear layers of one decoder layer as (short name, in_features, out_features); () = the Llama seven
    layer_linears: tuple = ()
    bias_params: int | None = None  # bias elements per layer (None: q/k/v biases when qkv_bias)
    norms_per_layer: int = 2  # hidden-width RMSNorms per layer (Gemma-2/3: 4)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3, Gemma-3)
    experts: int = 0  # mixture of experts: experts per layer (3-D parameters, not nn.Linear), top-k, width
    experts_per_token: int = 0
    expert_intermediate: int = 0
    router_params: int = 0
    sliding_window: int | None = None  # layers with sliding-window attention, and the window
    sliding_layers: int = 0
    eager_only: bool = False  # transformers has no SDPA path (Gemma-2: attention soft-capping)
    attn_softcap: bool = False
    rope_sets: int = 1  # rotary tables per forward (Gemma-3: local and global)
    total_params_exact: int | None = None  # from the meta build, when it counts more than the inventory
    source: str = "rules"  # rules (family rules) or meta (the transformers class on the meta device)
    config: dict | None = field(default=None, compare=False, hash=False, repr=False)  # raw config.json, for the trace

    def linears(self) -> dict[str, tuple[int, int]]:
        if self.layer_linears:
            return {n: (i, o) for n, i, o in self.layer_linears}
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
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def mlp_width(self) -> int:
        """The width of the MLP's hidden activations per token: the dense MLP's, or top-k experts' together."""
        return self.experts_per_token * self.expert_intermediate if self.moe else self.intermediate

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def expert_params_per_layer(self) -> int:
        return self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Norm weights, biases, routers: everything that is neither a decoder linear, an expert nor an embedding."""
        if self.bias_params is None:
            bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        else:
            bias = self.bias_params
        qk = 2 * self.head_dim if self.qk_norm else 0
        per_layer = self.norms_per_layer * self.hidden + bias + qk + self.router_params
        counted = self.layers * (per_layer + self.linear_params_per_layer + self.expert_params_per_layer) + \
            self.embedding_params * (1 if self.tied else 2) + self.hidden
        extra = (self.total_params_exact - counted) if self.total_params_exact else 0
        return self.layers * per_layer + self.hidden + extra

    @property
    def total_params(self) -> int:
        emb = self.embedding_params * (1 if self.tied else 2)
        return self.layers * (self.linear_params_per_layer + self.expert_params_per_layer) + emb + self.other_params

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (i + o) for n, (i, o) in self.linears().items() if _targeted(n, targets))

    def config_kwargs(self) -> dict:
        """Keyword arguments for transformers' config class of this architecture (used by the trace)."""
        if self.config is not None:
            return {k: v for k, v in self.config.items() if k not in ("model_type", "architectures", "auto_map")}
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


def shape_from_config(cfg: dict, name: str = "") -> ModelShape:
    """A ModelShape from a config.json dict: any decoder-only causal LM transformers ships (arch.inventory);
    UserError (one line: why, and what to set by hand) for what cannot be planned."""
    inv = dict(inventory(cfg, name))
    total = inv.pop("total_params", None)
    inv["layer_linears"] = tuple(tuple(x) for x in inv["layer_linears"])
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg else cfg
    shape = ModelShape(**inv, config=text)
    if total is not None:
        shape = replace(shape, total_params_exact=int(total))
    return shape


def read_model_config(name_or_path: str, revision: str | None = None) -> dict:
    """config.json of a local directory (nothing else needed in it) or of a hub id (downloaded alone, cached)."""
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
    # The training objective: sft, or a preference step (dpo / orpo: trl's DPOTrainer, 2 rows per pair). The DPO
    # reference: per_step (a no-grad forward in every step), precomputed (log-probs read from the batch) or none
    # (ORPO); ref_adapter: trl's frozen "ref" copy of the adapter is loaded (reference start; never a base copy).
    objective: str = "sft"
    reference: str = "none"
    ref_adapter: bool = False

    @property
    def preference(self) -> bool:
        return self.objective != "sft"

    @property
    def rows(self) -> int:
        """Sequences in one forward: the micro-batch, or for a preference step its pairs' chosen + rejected rows."""
        return self.micro_batch * (2 if self.preference else 1)

    @property
    def padded(self) -> bool:
        """A batch of several sequences is padded, so transformers builds a (B, 1, S, S) attention mask."""
        return (self.rows > 1 or self.packing) and self.attn != "flash_attention_2"

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


_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in"}


def _attention_layout(shape: ModelShape, s: TrainSetup) -> tuple[int, int]:
    """(layers whose attention gets a (B, 1, S, S) mask, boolean masks built per forward). A mask comes with
    padding, and on sliding-window layers whenever the sequence is longer than the window."""
    sliding = shape.sliding_layers if shape.sliding_window and s.attn != "flash_attention_2" else 0
    sliding_masked = sliding if (s.padded or s.seq_len > (shape.sliding_window or 0)) else 0
    full_masked = (shape.layers - sliding) if s.padded else 0
    return sliding_masked + full_masked, int(sliding_masked > 0) + int(full_masked > 0)


def _layer_saved_per_token(shape: ModelShape, s: TrainSetup, act: int, comp: int, cuda: bool,
                           masked: bool | None = None) -> float:
    """Bytes one decoder layer keeps for backward, per token, without checkpointing (`masked`: its attention has a
    (B, 1, S, S) mask; None: the share of the layers that have one)."""
    if masked is None:
        n_masked, _ = _attention_layout(shape, s)
        if 0 < n_masked < shape.layers:
            f = n_masked / shape.layers
            return f * _layer_saved_per_token(shape, s, act, comp, cuda, True) + \
                (1 - f) * _layer_saved_per_token(shape, s, act, comp, cuda, False)
        masked = n_masked > 0
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lin = shape.linears()
    total = shape.norms_per_layer * (4 * h + 4)  # each RMSNorm keeps its fp32 input and 1/rms
    if shape.qk_norm:  # per-head RMSNorms on q and k keep their fp32 inputs and 1/rms
        total += 4 * (q + kv) + 4 * (shape.heads + shape.kv_heads)
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
            group = _SHARED_INPUT.get(name, name)
            if group not in shared_inputs:  # fp32 without dropout: lora_A keeps x itself, shared by q/k/v, gate/up
                shared_inputs.add(group)
                total += comp * d_in
    # attention: q, k, v, the output and the log-sum-exp (flash / memory-efficient kernels)
    if s.attn == "eager" or shape.eager_only:
        # eager: k/v repeated per head, the (S x S) scores per head: softmax in fp32, cast back; soft-capping
        # (Gemma-2) keeps the tanh output as well
        total += comp * (q + 2 * q + q) + (4 + comp + (comp if shape.attn_softcap else 0)) * shape.heads * s.seq_len
    elif masked:
        # a mask: transformers repeats k/v for the heads (no enable_gqa with a mask), and SDPA turns the
        # boolean mask into an additive one in the compute dtype per layer, which the backward keeps
        total += comp * (4 * q) + 4 * shape.heads + comp * s.seq_len
    else:
        total += comp * (2 * q + 2 * kv) + 4 * shape.heads
    if "qkv_proj" in lin:  # fused q/k/v: v is a view of the fused output, which it keeps alive whole
        total += comp * (q + kv)
    if shape.moe:
        total += _moe_saved_per_token(shape, act, comp)
    else:
        # MLP: activation input, activation output and the up projection (in the residual stream's dtype)
        total += 3 * act * shape.intermediate
    return total


def _moe_saved_per_token(shape: ModelShape, act: int, comp: int) -> float:
    """A mixture-of-experts block (transformers 5 grouped_mm experts), per token: the router's fp32 softmax and
    top-k, and for each of the top-k experts its gate/up output, activation output, and the down output kept by
    the routing-weight multiply (the frozen experts need no saved input)."""
    e, k, i, h = shape.experts, shape.experts_per_token, shape.expert_intermediate, shape.hidden
    router = 4 * e + 8 * k + 4 * k
    experts = k * (3 * comp * i + comp * h + 8)
    return router + experts


def _widths(s: TrainSetup) -> tuple[int, int, int]:
    """Bytes per value of (the base weights, the residual stream, what autocast computes in). The residual stream
    is bf16/fp16 for LoRA; fp32 for QLoRA (peft's prepare_model_for_kbit_training upcasts norms and embeddings to
    fp32, so every norm output is fp32) and without autocast."""
    half = s.precision in ("bf16", "fp16")
    return (2 if half else 4), (2 if (half and s.quant == "none") else 4), (2 if half else 4)


def _param_shards(s: TrainSetup) -> int:
    """How many ways the parameters and the LoRA state are sharded: the world under FSDP / ZeRO-3, else 1."""
    return max(1, s.world_size) if s.strategy in ("fsdp", "zero3", "zero3-offload") else 1


def _base_weights(shape: ModelShape, s: TrainSetup) -> int:
    """The frozen base model per device. FSDP / ZeRO-3 keep a shard of it plus, unsharded, the layer being computed
    and the one prefetched; ZeRO-3 offload keeps only those two layers (the parameters live in CPU memory)."""
    model_bytes = _widths(s)[0]
    linear_params = shape.layers * shape.linear_params_per_layer
    rest = shape.total_params - linear_params  # embeddings, norms, biases (and an untied head)
    if s.quant == "none":
        weights = shape.total_params * model_bytes
    elif s.quant == "4bit":
        weights = linear_params // 2 + rest * 4  # 4-bit packed; the rest upcast to fp32 by peft
    else:  # 8bit (LLM.int8)
        weights = linear_params + rest * 4
    shard = _param_shards(s)
    gathered = 0
    if shard > 1:
        per_layer = shape.linear_params_per_layer * (0.5 if s.quant == "4bit" else 1 if s.quant == "8bit" else model_bytes)
        gathered = int(2 * per_layer)
        weights = weights // shard + gathered
    return gathered if s.strategy == "zero3-offload" else weights


def _quant_constants(shape: ModelShape, s: TrainSetup) -> int:
    """bitsandbytes' quantization state per device. 4-bit, per linear weight: its 16-entry fp32 NF4/FP4 code and an
    absmax per 64 weights (fp32; with double quantization uint8, plus an fp32 absmax per 256 blocks, a 256-entry
    fp32 code and an offset); checked against the bytes of loaded models (tests/test_qlora.py, quant.loaded_bytes).
    8-bit: an fp32 scale per output row."""
    L = shape.layers
    if s.quant == "none":
        return 0
    if s.quant == "4bit":
        per_weight = [-(-i * o // 64) for i, o in shape.linears().values()]
        blocks = L * sum(per_weight)
        if s.double_quant:
            qconst = blocks + L * sum(-(-n // 256) * 4 + 1024 + 4 + 64 for n in per_weight)
        else:
            qconst = blocks * 4 + L * len(per_weight) * 64
    else:
        qconst = L * sum(o for _, o in shape.linears().values()) * 4
    return qconst // _param_shards(s)


@dataclass(frozen=True)
class _LoraState:
    """The trainable side per device, in bytes: adapters, their gradients (and DDP's bucket copy), optimizer state,
    and the optimizer step's transient."""

    params: int
    grads: int
    optimizer_state: int
    optimizer_step: int
    ddp_buckets: int


def _lora_and_optimizer(shape: ModelShape, s: TrainSetup) -> _LoraState:
    """LoRA adapters, gradients and optimizer state per device. peft keeps adapters in fp32 over a bf16 base; QLoRA
    adapters are bf16 in a bf16 run, else fp32 (quant.adapter_dtype). FSDP / ZeRO-3 shard all of it, ZeRO-2 the
    gradients and optimizer state, ZeRO-3 offload keeps the optimizer state in CPU memory; DDP's gradient buckets
    copy the gradients."""
    n_lora = shape.lora_params(s.lora_r, s.lora_targets)
    lora_bytes = 2 if s.quant != "none" and s.precision == "bf16" else 4
    lora = n_lora * lora_bytes
    grads = n_lora * lora_bytes
    opt_state, opt_transient = _opt_state_bytes(s.optimizer, n_lora, lora_bytes)
    world, shard = max(1, s.world_size), _param_shards(s)
    if shard > 1:
        lora, grads = lora // shard, grads // shard
        opt_state //= shard
        opt_transient //= shard
    if s.strategy == "zero2" and world > 1:
        grads, opt_state, opt_transient = grads // world, opt_state // world, opt_transient // world
    if s.strategy == "zero3-offload":
        opt_state, opt_transient = 0, 0
    ddp_buckets = grads if s.strategy == "ddp" and world > 1 else 0
    return _LoraState(lora, grads, opt_state, opt_transient, ddp_buckets)


def _activations(shape: ModelShape, s: TrainSetup) -> tuple[float, float]:
    """(what the decoder layers keep for backward, the widest temporaries while one layer runs backward)."""
    _, act, comp = _widths(s)
    seq = s.seq_len
    tokens = s.micro_batch * seq
    L, h = shape.layers, shape.hidden
    per_layer = _layer_saved_per_token(shape, s, act, comp, s.device == "cuda")
    rope = 2 * shape.head_dim * act
    _, masks = _attention_layout(shape, s)
    mask = seq * masks  # each boolean (B, 1, S, S) mask, once per forward
    rope *= shape.rope_sets
    if s.gradient_checkpointing:
        saved_layers = tokens * (L * act * h)  # each checkpointed layer keeps its input
    else:
        saved_layers = tokens * L * per_layer
    saved_layers += tokens * (rope + mask)
    # a checkpointed layer is recomputed in the backward: its saved tensors come back, then its gradients;
    # without checkpointing the top layer's gradients are the same temporaries.
    grad_temps = tokens * _layer_backward_per_token(shape, s, act, comp)
    layer_transient = grad_temps + (tokens * per_layer if s.gradient_checkpointing else 0)
    if s.gradient_checkpointing and act == 4 and comp == 2:
        # QLoRA (fp32 residual): part of the recomputed MLP's saved tensors is freed before its widest gradient
        # temporaries exist (calibrated on the trace, every family: 2 bytes per intermediate element)
        layer_transient -= tokens * 2 * shape.mlp_width
    if (s.attn == "eager" or shape.eager_only) and s.gradient_checkpointing:
        # the recomputed layer's (S x S) score gradients (calibrated on the trace: a quarter byte per score)
        layer_transient += tokens * 0.5 * shape.heads * seq
    if s.quant == "4bit" and tokens > FOURBIT_DEQUANT_MIN_TOKENS:
        layer_transient += max(i * o for i, o in shape.linears().values()) * comp  # dequantised weight
    return saved_layers, layer_transient


def _loss_head(shape: ModelShape, s: TrainSetup) -> tuple[float, float, float]:
    """The LM head and loss: (what it keeps for backward, its forward peak, its backward peak). On CUDA trl's
    fused head computes log-probs in tiles, never the full logits; the CPU runs loraforge's plain head
    (trainer.add_plain_lm_head)."""
    _, act, comp = _widths(s)
    tokens, h, V = s.micro_batch * s.seq_len, shape.hidden, shape.vocab
    head_in = act  # the final norm's output: fp32 in QLoRA (fp32 norm weight)
    if s.device != "cuda":
        # logits of the labelled positions (at most every token), saved as log-probabilities for the backward,
        # plus the logits and their gradient while it runs
        return tokens * (head_in * h + 8 + V * 4), tokens * V * 4 * 2, tokens * V * 4 * 2
    head_saved = tokens * ((4 * h + 4) + head_in * h + 8 + 4 + 4 + 2 + 8)
    tile = min(tokens, HEAD_TOKEN_TILE) * HEAD_VOCAB_TILE * comp  # trl allocates the full tile width
    # QLoRA's fp32 head weight and fp32 hidden states are cast to the compute dtype tile by tile; in the backward
    # the previous tile's cast is still referenced while the next one is made
    cast_w = s.quant != "none" and s.precision in ("bf16", "fp16")
    cast_h = head_in != comp
    w_chunk = min(V, HEAD_VOCAB_TILE) * h * comp if cast_w else 0
    h_chunk = min(tokens, HEAD_TOKEN_TILE) * h * comp if cast_h else 0
    head_fwd = tile + w_chunk + h_chunk + tokens * 7 * 4
    head_bwd = tile + tokens * h * 4 + tokens * 4 + max(
        (min(V, 2 * HEAD_VOCAB_TILE) * h * comp if cast_w else 0) + h_chunk,  # two weight tiles
        (min(tokens, 2 * HEAD_TOKEN_TILE) * h * comp if cast_h else 0) + w_chunk,  # two token tiles
        w_chunk + h_chunk + tokens * h * head_in,  # the gradient cast back at the end
    )
    return head_saved, head_fwd, head_bwd


def _workspace(s: TrainSetup, tensor_peak: float) -> dict[str, float]:
    """What a tensor trace cannot see: on CUDA the context and cuBLAS workspaces (and NCCL's buffers with several
    processes), and the caching allocator's rounding and fragmentation."""
    if s.device != "cuda":
        return {"allocator_margin": int(MARGIN_SHARE * tensor_peak)}
    return {
        "cuda_context": CUDA_CONTEXT_BYTES + (NCCL_BYTES if max(1, s.world_size) > 1 else 0),
        "allocator_margin": int(MARGIN_SHARE * tensor_peak) + MARGIN_FLOOR,
    }


def estimate(shape: ModelShape, s: TrainSetup) -> MemoryEstimate:
    """Peak per-device memory of one training step of `s` on the architecture `shape`: each term per device, then
    their sum at the peak, which is the backward's (activations + loss head), the optimizer step's, or for DPO
    with a reference forward per step possibly that forward's (the policy's saved tensors are alive then)."""
    p = policy_setup(s)
    weights, qconst, lora = _base_weights(shape, p), _quant_constants(shape, p), _lora_and_optimizer(shape, p)
    saved_layers, layer_transient = _activations(shape, p)
    head_saved, head_fwd, head_bwd = _loss_head(shape, p)
    ref_adapter, ref_fwd = _reference_adapter(shape, s), _reference_forward(shape, s)
    notes = ["ZeRO-3 offload: parameters and optimizer state live in CPU memory"] if s.strategy == "zero3-offload" else []
    transient = max(head_fwd, head_bwd, layer_transient, ref_fwd)
    static = weights + qconst + lora.params + ref_adapter + lora.grads + lora.optimizer_state + lora.ddp_buckets
    fwd_bwd = saved_layers + head_saved + transient
    breakdown = {
        "base_weights": weights,
        "quant_constants": qconst,
        "lora_params": lora.params,
        "lora_grads": lora.grads + lora.ddp_buckets,
        "optimizer_state": lora.optimizer_state,
    }
    if s.preference:
        breakdown["reference_adapter"] = ref_adapter
        notes += preference_notes(s)
    if lora.optimizer_step > fwd_bwd:
        phase, tensor_peak = "optimizer", static + lora.optimizer_step
        breakdown |= {"activations": 0, "logits_and_loss": 0, "optimizer_step": lora.optimizer_step}
    else:
        phase, tensor_peak = "backward", static + fwd_bwd
        head_part = head_saved + (transient if transient in (head_fwd, head_bwd) and transient != ref_fwd else 0)
        ref_part = transient if transient == ref_fwd and ref_fwd > 0 else 0
        phase = "reference forward" if ref_part else phase
        breakdown |= {"activations": fwd_bwd - head_part - ref_part, "logits_and_loss": head_part}
        if s.preference:
            breakdown["reference_forward"] = ref_part
    breakdown |= _workspace(s, tensor_peak)
    return MemoryEstimate({k: int(v) for k, v in breakdown.items()}, int(tensor_peak), phase, notes)


# --------------------------------------------------------------------------------------------------
# The preference step (DPO / ORPO: trl's DPOTrainer, loraforge's run/preference.py)
# --------------------------------------------------------------------------------------------------


def policy_setup(s: TrainSetup) -> TrainSetup:
    """The policy's forward + backward of a preference step as the SFT step it equals: trl's collator puts a
    micro-batch's pairs in one padded batch of 2 x micro_batch rows (chosen, then rejected), DPOConfig's
    disable_dropout zeroes the LoRA dropout, and the loss goes through trl's fused head on every device. SFT: `s`."""
    if not s.preference:
        return s
    return s.with_(micro_batch=s.rows, lora_dropout=0.0, device="cuda", objective="sft", reference="none",
                   ref_adapter=False)


def _reference_adapter(shape: ModelShape, s: TrainSetup) -> int:
    """trl's frozen "ref" copy of the adapter (reference start): one more LoRA's weights, as peft creates them
    (fp32: add_adapter upcasts; trl's bf16 cast only touches trainable weights). The base is never copied."""
    if not (s.preference and s.ref_adapter):
        return 0
    return shape.lora_params(s.lora_r, s.lora_targets) * 4 // _param_shards(s)


def _reference_forward(shape: ModelShape, s: TrainSetup) -> float:
    """DPO with a reference forward per step: what that no-grad forward holds beyond the policy's saved tensors
    (trl runs it after the policy forward, before the backward; checkpointing off, nothing saved): the fused
    head's forward tile, its four per-token outputs, and the reference's own log-probs kept until the loss.
    0 for ORPO and a precomputed reference (its pass before training holds no policy state: never the peak)."""
    if s.objective != "dpo" or s.reference != "per_step":
        return 0
    p = policy_setup(s)
    _, act, comp = _widths(p)
    _, head_fwd, _ = _loss_head(shape, p)
    tokens = p.micro_batch * p.seq_len
    # the final hidden states and their shifted, flattened copy the head reads (trl's fused forward)
    head = head_fwd + tokens * (2 * act * shape.hidden + REFERENCE_OUTPUT_BYTES)
    return max(head, tokens * _nograd_layer_per_token(shape, p, act, comp))


# the reference forward's per-token outputs alive with the policy's: log-probs, entropy, mean logits (fp32),
# is-top-1 (bool), the label mask (bool), and the log-prob slice and masks of the loss (calibrated on the trace)
REFERENCE_OUTPUT_BYTES = 16


def _nograd_layer_per_token(shape: ModelShape, p: TrainSetup, act: int, comp: int) -> float:
    """The widest temporaries of one decoder layer run without gradients, per token: the MLP's gate, up, activation
    and product, and peft's casts of the down projection's input (each freed as soon as it is used): measured on
    the trace 6.5 bytes per intermediate element for bf16 LoRA, 12.8 with an fp32 residual stream (QLoRA, fp32);
    with eager attention the (S x S) scores per head, the mask added, the fp32 softmax and its cast back."""
    mlp = (8 if act == 2 else 13) * shape.mlp_width + 2 * act * shape.hidden
    if p.attn == "eager" or shape.eager_only:
        return shape.heads * p.seq_len * (3 * comp + 4) + mlp
    return mlp


def preference_notes(s: TrainSetup) -> list[str]:
    """One line: what the preference step's memory counts."""
    ref = {"per_step": "a reference forward without gradients in every step",
           "precomputed": "reference log-probs precomputed before training (no reference forward per step)",
           "none": "no reference (ORPO)"}[s.reference if s.objective == "dpo" else "none"]
    copy = "; the frozen reference adapter (no base copy)" if s.ref_adapter else "; no second copy of the base"
    cpu = ("; on the CPU trl's fused head computes its tiles with torch ops (more than this CUDA figure)"
           if s.device == "cpu" else "")
    return [f"{s.objective} step: two sequences per pair ({s.rows} rows of {s.seq_len} tokens in one forward, "
            f"dropout off) + {ref}{copy}{cpu}"]


def _layer_backward_per_token(shape: ModelShape, s: TrainSetup, act: int, comp: int) -> float:
    """Gradient temporaries while one decoder layer runs backward, per token, beyond what it keeps.

    The MLP is the widest part: the gradients of the down projection's input (base and adapter path, through
    peft's fp32 cast and dropout), of the SiLU output and of the up projection. Coefficients per element of the
    intermediate (I) and hidden (h) width, read off the op sequence and checked with trace.py:
    bf16/fp16 LoRA 10 I + 10 h with dropout, 6 I + 10 h without; QLoRA (fp32 residual) 10 I; fp32 8 I + 10 h.
    """
    inter, h = shape.mlp_width, shape.hidden
    dropout = s.lora_dropout > 0 and _targeted("down_proj", s.lora_targets)
    # an expert block's backward also holds the gradients of its top-k gathered inputs and weighted outputs
    # (calibrated on the trace: 1.5 values of the hidden width per routed copy)
    moe = 1.5 * comp * shape.experts_per_token * h if shape.moe else 0
    if comp == 4:
        return 8 * inter + 10 * h + moe
    if act == 4:
        return 10 * inter + moe
    return (10 if dropout else 6) * inter + 10 * h + moe


def model_shape(config: dict, name: str = "") -> ModelShape | None:
    """The shape of a config the memory model can plan, else None: the planner then splits the batch only, and the
    reason is logged in one line (memory is not checked)."""
    import logging

    try:
        return shape_from_config(config, name)
    except UserError as e:
        logging.getLogger("loraforge").warning("memory not planned: %s", e)
        return None
