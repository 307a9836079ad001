"""Export a fine-tuned run as one GGUF file for llama.cpp / Ollama: merge the adapter, then write the
weights, the tokenizer and the chat template with the `gguf` package's `GGUFWriter`.

What is written follows llama.cpp's `convert_hf_to_gguf.py` for the supported architectures (Llama, Mistral
without a sliding window, which llama.cpp runs as a Llama, Qwen2, Qwen3):
tensor names from `gguf.get_tensor_name_map`, Llama's q/k rows permuted into llama.cpp's rotary
layout (transformers' GGUF loader undoes exactly that), 1-D tensors (norms, biases) kept in F32, 2-D
weights in F16 or Q8_0 (a row length that is not a multiple of 32 stays F16), a GPT-2-style byte-level
BPE vocabulary with its merges, special token ids and chat template. Tied embeddings are written
once (no `output.weight`), as llama.cpp expects.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.checkpoints import verify_dir
from loraforge.errors import UserError
from loraforge.model.modeling import base_model_dir, resolve_model_path
from loraforge.use.infer import _load_run_recipe, is_run_dir, load_for_inference, note_full_precision_reload

log = logging.getLogger("loraforge")

# transformers model_type -> GGUF architecture name (gguf.MODEL_ARCH_NAMES)
# (Mistral without a sliding window is a Llama to llama.cpp: convert_hf_to_gguf writes MistralForCausalLM as llama)
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_TYPES = ("f16", "q8_0")

# tokenizer.json pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _unsupported(model_type: str | None) -> UserError:
    return UserError(
        f"GGUF export supports the {', '.join(sorted(SUPPORTED_ARCHITECTURES)[:-1])} and "
        f"{sorted(SUPPORTED_ARCHITECTURES)[-1]} architectures; this model is "
        f"'{model_type}'. Use `loraforge merge` for a transformers checkpoint instead"
    )


def _source_config_and_tokenizer_dir(path: Path):
    """(config of the model to export, directory holding its tokenizer, recipe or None), without loading weights."""
    from transformers import AutoConfig

    if is_run_dir(path):
        recipe = _load_run_recipe(path)
        config = AutoConfig.from_pretrained(
            base_model_dir(recipe), trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
        )
        return config, path, recipe
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), path, None
    raise UserError(f"{path}: neither a run directory (adapter_config.json) nor a merged model (config.json)")


def merged_model(path: str | Path):
    """The model with the adapter folded in (float32, CPU), and its tokenizer. A merged directory loads as is."""
    import torch

    note_full_precision_reload(Path(path))
    model, tokenizer = load_for_inference(path, device="cpu", full_precision=True)
    if is_run_dir(Path(path)):
        model = model.merge_and_unload()
    model.to(torch.float32).eval()
    return model, tokenizer


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its text-splitting regex), or None if unknown."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(regex)
    return None


def _source_gguf_pre(recipe) -> str | None:
    """When the base model was itself a GGUF file, its `tokenizer.ggml.pre`: transformers' GGUF loader does
    not rebuild every llama.cpp pre-tokenizer (e.g. SmolLM's), so the source file knows best."""
    if recipe is None:
        return None

    try:
        directory, gguf_file = resolve_model_path(recipe.model.name_or_path, recipe)
    except UserError:
        return None
    if gguf_file is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(Path(directory) / gguf_file)).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def vocabulary(tokenizer, n_vocab: int):
    """(tokens, token types) for ids 0..n_vocab-1, as convert_hf_to_gguf's get_vocab_base writes them."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= n_vocab:
        raise UserError(
            f"the tokenizer has ids up to {max(reverse)} but the model's embedding has {n_vocab} rows; "
            "resize the embeddings before exporting"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # embedding rows with no token (vocabularies padded to a multiple of 64...)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _rope(config) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def llama3_rope_factors(params: dict, head_dim: int):
    """The `rope_freqs.weight` tensor llama.cpp reads for Llama-3-style rope scaling (convert_hf_to_gguf)."""
    import numpy as np

    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_rotary(weights, n_head: int, n_head_kv: int | None = None):
    """Llama q/k rows from HF's rotate-half layout to llama.cpp's interleaved one (convert_hf_to_gguf's permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class _Source:
    """The model to export, as its config and tokenizer files describe it (no weights loaded yet)."""

    path: Path
    config: object
    recipe: object  # the run's recipe; None for a merged model directory
    tok_dir: Path
    tok_file: Path
    tok_json: dict
    arch_name: str  # the GGUF architecture
    theta: float
    rope: dict
    rope_type: str

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_head

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))


def _check_arguments(path: Path, out: Path, gguf_type: str, overwrite: bool) -> None:
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--type: '{gguf_type}' is not supported; use one of {', '.join(GGUF_TYPES)}")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give a run directory (or a merged model directory)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; choose a new file name (or --overwrite)")


def _byte_level_bpe(tok_dir: Path) -> tuple[Path, dict]:
    """tokenizer.json's path and content, refused unless it is a GPT-2-style byte-level BPE tokenizer."""
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{tok_dir}: no tokenizer.json; GGUF export needs the fast tokenizer saved with the run")
    tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
    tmodel = tok_json.get("model", {})
    if tmodel.get("type") != "BPE" or tmodel.get("byte_fallback") or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            "GGUF export writes GPT-2-style byte-level BPE tokenizers (Llama 3, SmolLM, Qwen2); this model's "
            "tokenizer is a different kind (e.g. SentencePiece); use `loraforge merge` and llama.cpp's converter"
        )
    return tok_file, tok_json


def _inspect(path: Path) -> _Source:
    """Step 1: what is exported, checked (architecture, tokenizer kind, rope scaling) before any weight loads."""
    verify_dir(path)  # a truncated adapter or model file: one line before any work
    config, tok_dir, recipe = _source_config_and_tokenizer_dir(path)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(model_type)
    arch_name = SUPPORTED_ARCHITECTURES[model_type]
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UserError(f"GGUF export: this Mistral uses sliding-window attention (window {config.sliding_window}), "
                        "which the llama architecture in GGUF does not have; use `loraforge merge` instead")
    tok_file, tok_json = _byte_level_bpe(tok_dir)
    theta, rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    allowed_rope = ("default", "linear", "llama3") if arch_name == "llama" else ("default",)
    if rope_type not in allowed_rope:
        raise UserError(
            f"GGUF export: rope scaling '{rope_type}' is not supported for {arch_name} (supported: {', '.join(allowed_rope)})"
        )
    return _Source(path=path, config=config, recipe=recipe, tok_dir=tok_dir, tok_file=tok_file, tok_json=tok_json,
                   arch_name=arch_name, theta=theta, rope=rope, rope_type=rope_type)


def _pre_tokenizer(src: _Source) -> str:
    pre = _source_gguf_pre(src.recipe) or pre_tokenizer_name(src.tok_json)
    if pre is None:
        log.warning("unknown pre-tokenizer in %s; writing 'default' (llama.cpp may split text differently)", src.tok_file)
        pre = "default"
    return pre


def _write_metadata(writer, src: _Source, n_vocab: int, gguf_type: str) -> None:
    """Step 3: the model's hyperparameters, as llama.cpp's converter writes them."""
    import gguf

    config, n_head = src.config, src.n_head
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(src.path.resolve().name)
    writer.add_description("LoRA fine-tune merged and exported by loraforge")
    writer.add_block_count(src.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(src.n_kv)
    writer.add_rope_freq_base(src.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    if src.head_dim != config.hidden_size // n_head or src.arch_name == "qwen3":  # Qwen3's head_dim is its own
        writer.add_key_length(src.head_dim)
        writer.add_value_length(src.head_dim)
    if src.arch_name == "llama":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(src.head_dim)
    if src.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(src.rope["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, src: _Source, tokenizer, vocab: tuple[list, list], pre: str, n_vocab: int) -> None:
    """Step 3 (cont.): the vocabulary, merges, special tokens and chat template."""
    import gguf

    tokens, token_types = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(src.tok_dir, load_merges=True, n_vocab=n_vocab)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    # Say whether BOS/EOS are added as the tokenizer really does, rather than leave it to llama.cpp's default.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    special.add_to_gguf(writer, quiet=True)


def _add_tensor(writer, src: _Source, name: str, new_name: str, tensor, gguf_type: str) -> None:
    """One weight: Llama's q/k rows permuted, 1-D in F32, 2-D in F16 or Q8_0 (rows not a multiple of 32: F16)."""
    import gguf
    import numpy as np

    data = tensor.detach().to("cpu").float().numpy()
    if src.arch_name == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_rotary(data, src.n_head, src.n_head)
    elif src.arch_name == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_rotary(data, src.n_head, src.n_kv)
    data = np.ascontiguousarray(data)
    if data.ndim <= 1:
        writer.add_tensor(new_name, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(new_name, data.astype(np.float16))


def _write_tensors(writer, src: _Source, model, gguf_type: str) -> None:
    """Step 4: every weight under its GGUF name (Llama-3 rope factors first; a tied lm_head not at all)."""
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == src.arch_name)
    names = gguf.get_tensor_name_map(arch, src.n_layers)
    if src.rope_type == "llama3":
        factors = llama3_rope_factors(src.rope | {"rope_theta": src.theta}, src.head_dim)
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    for name, tensor in model.state_dict().items():
        if src.tied and name == "lm_head.weight":
            continue  # llama.cpp (and transformers' GGUF loader) tie when output.weight is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor '{name}' of this {src.arch_name} model")
        _add_tensor(writer, src, name, new_name, tensor, gguf_type)


def _write_atomically(out: Path, arch_name: str, fill) -> None:
    """Step 5: `fill(writer)` adds everything, then the file is written beside `out` and renamed onto it, so
    that a failure (or ^C) leaves no half-written GGUF file."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)


def export_gguf(path: str | Path, out: str | Path, gguf_type: str = "f16", overwrite: bool = False) -> Path:
    """Merge the run's adapter (or take a merged model directory) and write one GGUF file to `out`."""
    try:
        import gguf  # noqa: F401 - an optional dependency: say how to get it before any work
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install 'gguf>=0.19.0' (or loraforge[demo])") from None

    path, out = Path(path), Path(out)
    _check_arguments(path, out, gguf_type, overwrite)
    src = _inspect(path)
    model, tokenizer = merged_model(path)  # step 2: the adapter folded in
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = vocabulary(tokenizer, n_vocab)
    pre = _pre_tokenizer(src)

    def fill(writer):
        _write_metadata(writer, src, n_vocab, gguf_type)
        _write_tokenizer(writer, src, tokenizer, vocab, pre, n_vocab)
        _write_tensors(writer, src, model, gguf_type)

    _write_atomically(out, src.arch_name, fill)
    return out
