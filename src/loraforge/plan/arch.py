"""The architecture's parameter inventory, from config.json alone: every decoder linear with its shape, the
mixture-of-experts weights, norms, biases, tied embeddings, and the attention layout (sliding windows, soft-capping).

Two sources give the same answer:

* family rules, torch-free and instant, for the decoder families people fine-tune (`FAMILIES`);
* the real transformers model class built on the meta device (no memory, no weights), for any other decoder-only
  causal LM that transformers ships. That costs importing torch once (seconds); the result is cached on disk
  (`$LORAFORGE_CACHE/inventory/`), keyed by the config and the transformers version.

tests/test_architectures.py checks, for every fixture config, that the rules give exactly what the meta build gives.
An architecture neither source can plan (encoder-decoder, remote code, not a causal LM) raises a one-line UserError
saying why and what to set by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from loraforge.errors import UserError

BY_HAND = "set training.micro_batch_size / gradient_accumulation_steps / gradient_checkpointing by hand"

# model_type -> what the rules need to know beyond a Llama layer
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_default": 4096},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "smollm3": {},
    "qwen3_moe": {"qk_norm": True, "moe": True},
    "mixtral": {"moe": True},
    "gemma": {"embed_scale": True},
    "gemma2": {"norms": 4, "eager_only": True, "alternating": 2},
    "gemma3_text": {"norms": 4, "qk_norm": True, "alternating": 6, "rope_sets": 2},
    "phi3": {"fused": True},
}


def inventory(cfg: dict, name: str = "") -> dict:
    """The inventory (ModelShape's fields) of a config.json dict; UserError when it cannot be planned."""
    if isinstance(cfg.get("text_config"), dict) and cfg.get("model_type") not in FAMILIES:
        text = cfg["text_config"]
        return inventory(text | {"model_type": text.get("model_type") or cfg.get("model_type", "")}, name)
    why = unplannable(cfg)
    if why:
        raise UserError(f"model config: {why}; {BY_HAND}")
    if cfg.get("model_type") in FAMILIES:
        inv = rules_inventory(cfg)
    else:
        inv = meta_inventory(cfg)
    return inv | {"name": name}


def unplannable(cfg: dict) -> str | None:
    """Why this config cannot be planned, or None. Torch-free: transformers' model-type table is not imported here."""
    mt = cfg.get("model_type", "")
    if not mt:
        return "config.json has no model_type; is it a transformers model?"
    if cfg.get("is_encoder_decoder"):
        return f"'{mt}' is an encoder-decoder model; loraforge plans decoder-only causal LMs"
    if mt in FAMILIES:
        return None
    if cfg.get("auto_map") and not _known_to_transformers(mt):
        return (f"'{mt}' is remote code (config.json auto_map), which the memory model does not run "
                "(model.trust_remote_code only lets training run it)")
    return None


def _known_to_transformers(mt: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return mt in CONFIG_MAPPING_NAMES


# --------------------------------------------------------------------------------------------------
# Family rules (torch-free)
# --------------------------------------------------------------------------------------------------


def rules_inventory(cfg: dict) -> dict:
    mt = cfg["model_type"]
    fam = FAMILIES[mt]
    h, heads, L, kv, hd, inter, vocab = _dimensions(cfg)
    q, k = heads * hd, kv * hd
    attn_bias = fam.get("qkv_bias", False) or (mt not in ("mistral", "mixtral", "phi3") and bool(cfg.get("attention_bias")))
    linears, bias = _rules_linears(cfg, fam, h, q, k, inter, attn_bias)
    experts, top_k, expert_inter, router = _rules_experts(cfg, fam, h, inter)
    window, sliding_layers = _rules_sliding(cfg, fam, L)
    return dict(
        model_type=mt, hidden=h, layers=L, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter, vocab=vocab,
        tied=bool(cfg.get("tie_word_embeddings", mt in ("gemma", "gemma2", "gemma3_text"))),
        qkv_bias=attn_bias, max_positions=cfg.get("max_position_embeddings"),
        layer_linears=tuple(tuple(x) for x in linears), bias_params=bias,
        norms_per_layer=fam.get("norms", 2), qk_norm=fam.get("qk_norm", False),
        experts=experts, experts_per_token=top_k, expert_intermediate=expert_inter, router_params=router,
        sliding_window=int(window) if window else None, sliding_layers=sliding_layers,
        eager_only=fam.get("eager_only", False),
        attn_softcap=bool(cfg.get("attn_logit_softcapping", 50.0 if mt == "gemma2" else None)),
        rope_sets=fam.get("rope_sets", 1), source="rules",
    )


def _dimensions(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, heads, layers, kv heads, head dim, intermediate, vocabulary) of a config.json dict."""
    try:
        h, heads, L = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or h // heads)
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise UserError(f"model config: config.json has no {e.args[0]}; is it a causal language model?") from None
    return h, heads, L, kv, hd, inter, vocab


def _rules_linears(cfg: dict, fam: dict, h: int, q: int, k: int, inter: int, attn_bias: bool) -> tuple[list, int]:
    """The nn.Linear layers of one decoder layer as [short name, in, out] in module order (a mixture of experts:
    attention only), and the layer's bias elements."""
    mt = cfg["model_type"]
    if fam.get("fused"):
        linears = [["o_proj", q, h], ["qkv_proj", h, q + 2 * k]]  # the module order of Phi3Attention
    else:
        linears = [["q_proj", h, q], ["k_proj", h, k], ["v_proj", h, k], ["o_proj", q, h]]
    bias = 0
    if attn_bias:  # Qwen2: q/k/v only; the others that have attention_bias: q/k/v/o
        bias = q + 2 * k + (0 if mt == "qwen2" else h)
    if fam.get("moe"):
        return linears, bias
    if fam.get("fused"):
        linears += [["gate_up_proj", h, 2 * inter], ["down_proj", inter, h]]
    else:
        linears += [["gate_proj", h, inter], ["up_proj", h, inter], ["down_proj", inter, h]]
        if cfg.get("mlp_bias"):
            bias += 2 * inter + h
    return linears, bias


def _rules_experts(cfg: dict, fam: dict, h: int, inter: int) -> tuple[int, int, int, int]:
    """(experts per layer, experts per token, expert intermediate width, router parameters); zeros when dense."""
    if not fam.get("moe"):
        return 0, 0, 0, 0
    mt = cfg["model_type"]
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise UserError(f"model config: '{mt}' with dense layers between expert layers (mlp_only_layers / "
                        f"decoder_sparse_step) is not modelled; {BY_HAND}")
    try:  # transformers 5 saves Qwen3-MoE's num_experts as num_local_experts
        experts = int(cfg.get("num_experts") or cfg["num_local_experts"])
        expert_inter = int(cfg["moe_intermediate_size"]) if mt == "qwen3_moe" else inter
        top_k = int(cfg["num_experts_per_tok"])
    except KeyError as e:
        raise UserError(f"model config: config.json of '{mt}' has no {e.args[0]}") from None
    return experts, top_k, expert_inter, experts * h


def _rules_sliding(cfg: dict, fam: dict, L: int) -> tuple[int | None, int]:
    """Sliding-window attention: (the window or None, how many of the L layers use it)."""
    mt = cfg["model_type"]
    window = cfg.get("sliding_window", fam.get("sliding_default"))
    if mt in ("qwen2", "qwen3", "smollm3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        window = None
    sliding_layers = 0
    if window:
        every = fam.get("alternating")
        if cfg.get("layer_types"):
            sliding_layers = sum(t == "sliding_attention" for t in cfg["layer_types"])
        elif every:
            every = int(cfg.get("sliding_window_pattern", every)) if mt == "gemma3_text" else every
            sliding_layers = sum(1 for i in range(L) if (i + 1) % every)
        else:
            sliding_layers = L
    return window, sliding_layers


# --------------------------------------------------------------------------------------------------
# The real model class on the meta device (any decoder-only causal LM transformers ships), cached
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge")) / "inventory"


def meta_inventory(cfg: dict, use_cache: bool = True) -> dict:
    """The inventory read off the transformers model class instantiated on the meta device."""
    import importlib.metadata

    version = importlib.metadata.version("transformers")
    key = hashlib.sha256((json.dumps(cfg, sort_keys=True, default=str) + version).encode()).hexdigest()[:20]
    path = cache_dir() / f"{cfg.get('model_type', 'model')}-{key}.json"
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    inv = _build_meta_inventory(cfg)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(inv))
            os.replace(tmp, path)
        except OSError:
            pass
    return inv


def _build_meta_inventory(cfg: dict) -> dict:
    mt = cfg["model_type"]
    config, model = _meta_model(cfg)
    text = config.get_text_config()
    L = int(text.num_hidden_layers)
    layer = _uniform_layer(model, mt, L)
    h = int(text.hidden_size)
    linears, bias, norms, qk_norm, experts, expert_inter, router = _layer_inventory(layer, h)
    heads = int(text.num_attention_heads)
    hd = int(getattr(text, "head_dim", None) or h // heads)
    types = list(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None)
    sliding = sum(t == "sliding_attention" for t in types) if types else (L if window else 0)
    if not window:
        sliding = 0
    inter = int(getattr(text, "intermediate_size", 0) or 0)
    total = sum(p.numel() for p in model.parameters())
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    inv = dict(
        model_type=mt, hidden=h, layers=L, heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=hd, intermediate=inter, vocab=int(text.vocab_size),
        tied=out_emb is not None and out_emb.weight is in_emb.weight,
        qkv_bias=bias > 0, max_positions=getattr(text, "max_position_embeddings", None),
        layer_linears=tuple(linears), bias_params=bias, norms_per_layer=norms, qk_norm=qk_norm,
        experts=int(experts), experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0) if experts else 0,
        expert_intermediate=int(expert_inter), router_params=router,
        sliding_window=int(window) if window and sliding else None, sliding_layers=sliding,
        eager_only=not getattr(type(model), "_supports_sdpa", True),
        attn_softcap=bool(getattr(text, "attn_logit_softcapping", None)),
        rope_sets=1 + ("sliding_attention" in types and mt.startswith("gemma3")), source="meta",
    )
    # anything else (extra embeddings, final norm width...) is counted so that the total is exact
    inv["total_params"] = int(total)
    return json.loads(json.dumps(inv))  # JSON-able, the same whether fresh or cached


def _meta_model(cfg: dict):
    """(transformers config, causal-LM model on the meta device) of a config.json dict; UserError when transformers
    does not know the model type, has no causal-LM class for it, or cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = cfg["model_type"]
    if not _known_to_transformers(mt):
        raise UserError(f"model config: transformers {_tf_version()} does not know model_type '{mt}' "
                        f"(a newer transformers, or remote code?); {BY_HAND}")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"model config: '{mt}' has no causal-LM class in transformers (not a decoder LM); {BY_HAND}")
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    try:
        config = AutoConfig.for_model(mt, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build
        raise UserError(f"model config: transformers cannot build '{mt}' from this config.json "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); {BY_HAND}") from None
    return config, model


def _uniform_layer(model, mt: str, L: int):
    """The first of the model's L decoder layers; UserError when they cannot be found or differ in shape."""
    layers = _decoder_layers(model, L)
    if layers is None:
        raise UserError(f"model config: cannot find the {L} decoder layers of '{mt}'; {BY_HAND}")
    sigs = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers}
    if len(sigs) != 1:
        raise UserError(f"model config: the layers of '{mt}' differ in shape (mixed dense / expert layers?); "
                        f"the memory model plans uniform decoder layers; {BY_HAND}")
    return layers[0]


def _layer_inventory(layer, h: int) -> tuple[list, int, int, bool, int, int, int]:
    """What one decoder layer holds: (its nn.Linear layers as (short name, in, out), bias elements, hidden-width
    norms, per-head q/k norms, experts, expert intermediate width, router parameters)."""
    import torch

    linears, bias, norms, qk_norm, experts, expert_inter, router = [], 0, 0, False, 0, 0, 0
    lin_params = set()
    for full, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append((full.rsplit(".", 1)[-1], mod.in_features, mod.out_features))
            lin_params.add(f"{full}.weight")
            if mod.bias is not None:
                bias += mod.bias.numel()
                lin_params.add(f"{full}.bias")
    for pname, p in layer.named_parameters():
        if pname in lin_params:
            continue
        if p.dim() == 3:
            experts = p.shape[0]
            if "down" in pname:
                expert_inter = p.shape[-1] if p.shape[1] == h else p.shape[1]
        elif p.dim() == 2:
            router += p.numel()
        elif p.dim() == 1 and "norm" in pname:
            if p.numel() == h:
                norms += 1
            else:
                qk_norm = True
        else:
            bias += p.numel()
    expert_params = sum(p.numel() for n, p in layer.named_parameters() if p.dim() == 3)
    if experts and expert_params != experts * 3 * h * expert_inter:
        bias += expert_params - experts * 3 * h * expert_inter  # expert biases
    return linears, bias, norms, qk_norm, experts, expert_inter, router


def _decoder_layers(model, n: int):
    import torch

    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return list(mod)
    return None


def _tf_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformers")


def check_setup(shape, quant: str, targets, dropout: float, attn: str = "auto") -> None:
    """Refuse, in one line, the settings this stack cannot train on this architecture (rather than plan them)."""
    mt = shape.model_type
    if shape.eager_only and attn in ("sdpa", "flash_attention_2"):
        raise UserError(f"model.attn_implementation: {attn} — transformers has no {attn} path for '{mt}' (attention "
                        "soft-capping); set model.attn_implementation: eager")
    names = list(shape.linears())
    if targets != "all-linear":
        missing = [t for t in targets if t not in names]
        if missing:
            hint = " (Phi-3/4 fuse q/k/v into qkv_proj and gate/up into gate_up_proj)" if "qkv_proj" in names else ""
            raise UserError(f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are "
                            f"{', '.join(names)} ('{mt}'){hint} (or use all-linear)")
    if not getattr(shape, "experts", 0):
        return
    attn = names
    if quant != "none":
        raise UserError(
            f"quantization.mode: {quant} on the mixture-of-experts model '{mt}': bitsandbytes quantizes nn.Linear "
            "layers only, the experts are 3-D parameters that peft's prepare_model_for_kbit_training upcasts to fp32 "
            "(4 bytes per weight) and transformers' grouped_mm experts then refuse; set quantization.mode: none"
        )
    if targets == "all-linear":
        raise UserError(
            f"lora.target_modules: all-linear on the mixture-of-experts model '{mt}' makes peft put LoRA on every "
            f"expert's 3-D weights and the router (needs lora.dropout 0; not in the memory model); list the "
            f"linear layers instead, e.g. [{', '.join(attn)}]"
        )


def notes(shape) -> list[str]:
    """What the plan should say about this architecture: what is exact, what is modelled."""
    out = []
    if shape.source == "meta":
        out.append(f"'{shape.model_type}': parameter inventory from the transformers class on the meta device (exact); "
                   "activations modelled as a generic decoder layer (check with `loraforge plan --trace`)")
    if shape.experts:
        gib = shape.layers * shape.expert_params_per_layer * 2 / 2**30
        out.append(f"mixture of experts: all {shape.experts} experts per layer resident ({gib:.1f} GiB in bf16), "
                   f"activations for {shape.experts_per_token} per token; the experts are frozen (not nn.Linear)")
    if "qkv_proj" in shape.linears() or "gate_up_proj" in shape.linears():
        out.append("fused projections (qkv_proj, gate_up_proj): all-linear puts one adapter on each fused layer")
    if shape.eager_only:
        out.append(f"'{shape.model_type}' runs eager attention (transformers has no SDPA path with soft-capping): "
                   "the (S x S) scores of every head are kept per layer")
    if shape.sliding_layers and shape.sliding_window:
        out.append(f"sliding-window attention on {shape.sliding_layers} of {shape.layers} layers (window "
                   f"{shape.sliding_window}): beyond it those layers get a (S x S) mask")
    return out
