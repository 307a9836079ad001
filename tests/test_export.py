"""`loraforge export --gguf`: the GGUF file transformers reads back (`gguf_file=`) computes what the merged
model computes. f16: equal to the merged model with its matrices rounded to f16 (so the only difference
is that rounding); q8_0: equal to the merged model with its matrices rounded through Q8_0, and close to
the unrounded one (stated tolerance below). Tiny random Llama and Qwen2 runs for the logic; the real
quickstart model (slow) for the proof on a real pretrained checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHATS, chat_records, recipe_dict, write_jsonl
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import UserError

runner = CliRunner()

# f16 vs the unrounded merged model: max |logit difference| within 1% of the largest |logit| (measured:
# 0.3% on the tiny models, 0.07% on the quickstart model). q8_0: mean KL divergence of the next-token
# distributions at most 0.02 nats (measured: 0.005 on the tiny random models, 0.0014 on the quickstart
# model) and, on the real model, the same top token at >= 90% of positions (measured: 97%).
F16_MAX_REL = 1e-2
Q8_MAX_MEAN_KL = 0.02
Q8_MIN_ARGMAX_AGREEMENT = 0.9


def _adapter_run(tmp: Path, base_dir: Path, tokenizer, recipe: dict | None = None, b_std: float | None = None) -> Path:
    """A run directory (adapter, tokenizer, recipe.yaml) with a random, non-zero LoRA: no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=b_std is None, task_type="CAUSAL_LM")
    )
    if b_std is not None:  # a small update, so that a real model stays a sensible model
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_std)
    run = tmp / "run"
    peft.save_pretrained(run)
    tokenizer.save_pretrained(run)
    if recipe is None:
        recipe = recipe_dict(base_dir, write_jsonl(tmp / "train.jsonl", chat_records(8)), run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.3, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir, tiny_qwen2_dir, tiny_tokenizer) -> dict[str, Path]:
    return {
        "llama": _adapter_run(tmp_path_factory.mktemp("llama-run"), tiny_model_dir, tiny_tokenizer),
        "qwen2": _adapter_run(tmp_path_factory.mktemp("qwen2-run"), tiny_qwen2_dir, tiny_tokenizer),
    }


def _chat_ids(tokenizer, n: int = 3) -> torch.Tensor:
    messages = []
    for q, a in CHATS[:n]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rounded(model, gguf_type: str):
    """The merged model with every matrix rounded as the GGUF file stores it (1-D tensors stay f32)."""
    import gguf

    rounded = copy.deepcopy(model)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim < 2:
                continue
            if gguf_type == "q8_0" and p.shape[-1] % 32 == 0:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
            else:
                p.copy_(p.half().float())
    return rounded


def _check_round_trip(run: Path, out: Path, gguf_type: str, ids_from=None) -> dict:
    """Export `run`, load the file with transformers, compare logits; returns the measured differences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.use.export import export_gguf
    from loraforge.use.infer import load_for_inference

    path = export_gguf(run, out, gguf_type)
    assert path == out and out.is_file() and not list(out.parent.glob(".*.tmp"))

    adapter_model, tokenizer = load_for_inference(run, device="cpu")  # base + adapter, unmerged: the oracle
    ids = _chat_ids(tokenizer)
    expected = _logits(adapter_model, ids)
    merged = adapter_model.merge_and_unload()
    exact = _logits(_rounded(merged, gguf_type), ids)

    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    got = _logits(loaded, ids)
    scale = expected.abs().max().item()
    # 1. the file holds exactly the merged weights (names, q/k permutation, tying, norms, biases all right)
    assert (got - exact).abs().max().item() <= 1e-4 * scale
    diff = (got - expected).abs()
    p, q = expected.log_softmax(-1), got.log_softmax(-1)
    measured = {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "logit_scale": scale,
        "mean_kl": (p.exp() * (p - q)).sum(-1).mean().item(),
        "argmax_agreement": (expected.argmax(-1) == got.argmax(-1)).float().mean().item(),
    }
    # 2. ... and so differs from the unrounded model by rounding alone
    if gguf_type == "f16":
        assert measured["max_abs"] <= F16_MAX_REL * scale, measured
        assert measured["argmax_agreement"] >= 0.98, measured
    else:
        assert measured["mean_kl"] <= Q8_MAX_MEAN_KL, measured

    # the tokenizer travels too: same ids for the rendered chat, same chat template and special tokens
    gtok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHATS[0][0]}], tokenize=False, add_generation_prompt=True)
    assert gtok(rendered, add_special_tokens=False)["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert gtok("Hello there")["input_ids"] == tokenizer("Hello there")["input_ids"]  # BOS/EOS added alike
    assert gtok.chat_template == tokenizer.chat_template
    assert (gtok.eos_token, gtok.bos_token, gtok.pad_token) == (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    return measured


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_run_round_trips_through_transformers(tiny_runs, tmp_path, arch, gguf_type):
    measured = _check_round_trip(tiny_runs[arch], tmp_path / f"{arch}.gguf", gguf_type)
    print(arch, gguf_type, json.dumps(measured))


def test_file_layout_follows_llama_cpp(tiny_runs, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    from loraforge.use.export import export_gguf

    out = export_gguf(tiny_runs["llama"], tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert "{% for message in messages %}" in fields["tokenizer.chat_template"]
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert "output.weight" in types  # this tiny model does not tie its embeddings
    assert not any("lora" in name for name in types)


def test_refuses_other_architectures_and_tokenizers(tmp_path, tiny_model_dir):
    from transformers import GPT2Config

    from loraforge.use.export import export_gguf

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    with pytest.raises(UserError, match="supports the llama, mistral, qwen2 and qwen3 architectures; this model is 'gpt2'"):
        export_gguf(gpt2, tmp_path / "x.gguf")

    spm = tmp_path / "spm"
    shutil.copytree(tiny_model_dir, spm)
    tok = json.loads((spm / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True  # how SentencePiece-style BPE tokenizers (Llama 2, Mistral) look
    (spm / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="GPT-2-style byte-level BPE"):
        export_gguf(spm, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="--type"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_llama3_rope_factors_match_transformers():
    """Llama 3.x rope scaling travels as llama.cpp's `rope_freqs` tensor; its factors are exactly the ratio
    of transformers' plain and llama3-scaled inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loraforge.use.export import _rope, llama3_rope_factors

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=8192, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 2048,
    })
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    factors = torch.from_numpy(llama3_rope_factors(_rope(config)[1], 32))
    assert len({round(f, 3) for f in factors.tolist()}) >= 3  # unscaled, smoothed and fully scaled bands
    torch.testing.assert_close(factors, plain / scaled, rtol=1e-5, atol=1e-6)


def test_cli_export(tiny_runs, tmp_path):
    run = str(tiny_runs["llama"])
    out = tmp_path / "cli.gguf"
    ok = runner.invoke(app, ["export", run, "--gguf", "--type", "q8_0", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert out.is_file() and "q8_0" in ok.output
    again = runner.invoke(app, ["export", run, "--gguf", "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    no_format = runner.invoke(app, ["export", run, "--out", str(tmp_path / "y.gguf")])
    assert no_format.exit_code == 2 and "--gguf" in no_format.output


@pytest.mark.slow
def test_quickstart_model_round_trips_through_transformers(tmp_path):
    """The proof on the real SmolLM2-135M-Instruct (Llama, tied embeddings, 9 query / 3 kv heads)."""
    from gguf import GGUFReader

    from loraforge.model.modeling import base_model_dir, load_tokenizer
    from loraforge.recipe import dump_recipe, load_recipe
    from loraforge.resources import find_recipe

    recipe_path = find_recipe("quickstart")
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'run'}"])
    base = base_model_dir(recipe)
    run = _adapter_run(tmp_path, Path(base), load_tokenizer(base, recipe), recipe=None, b_std=0.02)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    (run / "source.json").write_text(json.dumps({"recipe": str(recipe_path)}))

    for gguf_type in ("f16", "q8_0"):
        out = tmp_path / f"quickstart-{gguf_type}.gguf"
        measured = _check_round_trip(run, out, gguf_type)
        print("quickstart", gguf_type, json.dumps(measured))
        assert measured["argmax_agreement"] >= (0.98 if gguf_type == "f16" else Q8_MIN_ARGMAX_AGREEMENT), measured
    reader = GGUFReader(str(out))
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied, as llama.cpp expects
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # from the source GGUF
    assert reader.fields["llama.attention.head_count_kv"].contents() == 3
    # The package's GGUF was written by llama.cpp's own converter: our file says the same about the model
    # and its tokenizer, and has the same tensors.
    from loraforge.model.modeling import resolve_model_path

    directory, name = resolve_model_path(recipe.model.name_or_path, recipe)
    source = GGUFReader(str(Path(directory) / name))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.model",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.context_length", "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
                "llama.attention.head_count", "llama.rope.freq_base", "llama.rope.dimension_count",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size"):
        assert reader.fields[key].contents() == source.fields[key].contents(), key
    assert {t.name: tuple(t.shape) for t in reader.tensors} == {t.name: tuple(t.shape) for t in source.tensors}
