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

from loraforge.errors import UserError
from loraforge.recipe import load_recipe

from conftest import chat_records, recipe_dict, write_jsonl

bnb = pytest.importorskip("bitsandbytes")


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train_capturing(recipe, monkeypatch):
    """train.run(recipe), also returning the peft model it trained (captured from modeling.add_lora)."""
    from loraforge import modeling
    from loraforge.train import run

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
    from loraforge.quant import backend_problem

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


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_base_trains_and_really_is_4bit(quant_type, double_quant, tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model_dir, training={"max_steps": 20, "learning_rate": 1e-2},
                          quantization={"mode": "4bit", "quant_type": quant_type, "double_quant": double_quant})
    result, model = train_capturing(recipe, monkeypatch)
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
    from loraforge.quant import adapter_dtype

    assert adapter_dtype("4bit", "bf16") == "bfloat16"  # the QLoRA paper / trl on a bf16 GPU
    assert adapter_dtype("4bit", "fp32") == "float32"  # the CPU
    assert adapter_dtype("8bit", "fp16") == "float32"  # the fp16 grad scaler needs fp32 master weights
    assert adapter_dtype("none", "bf16") == "float32"  # peft's default over a plain base


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_train_on_the_cpu(optimizer, tmp_path, tiny_model_dir, monkeypatch):
    from loraforge.quant import optimizer_fallback

    assert optimizer_fallback(optimizer, "cpu") == (optimizer, None)  # they run here: no fallback
    recipe = write_recipe(tmp_path, tiny_model_dir, training={"max_steps": 6, "learning_rate": 1e-2, "optimizer": optimizer},
                          quantization={"mode": "4bit"})
    seen = {}
    from loraforge import trainer as trainer_mod

    make = trainer_mod.make_trainer_class

    def spy():
        cls = make()

        class Spy(cls):
            def create_optimizer(self, *a, **k):
                opt = super().create_optimizer(*a, **k)
                seen["optimizer"] = (type(opt).__module__.split(".")[0], opt.args.optim_bits, opt.is_paged)
                return opt

        return Spy

    monkeypatch.setattr(trainer_mod, "make_trainer_class", spy)
    result, _ = train_capturing(recipe, monkeypatch)
    expected = {"adamw_8bit": 8, "paged_adamw_8bit": 8, "paged_adamw_32bit": 32}
    assert seen["optimizer"] == ("bitsandbytes", expected[optimizer], optimizer.startswith("paged"))
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0], losses


def test_optimizer_without_a_kernel_falls_back_with_one_line(monkeypatch):
    from loraforge import quant

    monkeypatch.setitem(quant._RUNS, "paged_adamw_8bit", False)
    optim, note = quant.optimizer_fallback("paged_adamw_8bit", "cpu")
    assert optim == "adamw_torch" and "\n" not in note
    assert note.startswith("training.optimizer: paged_adamw_8bit has no bitsandbytes kernel on the cpu; using adamw_torch")
    assert quant.optimizer_fallback("paged_adamw_8bit", "cuda") == ("paged_adamw_8bit", None)
    assert quant.optimizer_fallback("adamw_torch", "cpu") == ("adamw_torch", None)


def test_cpu_kernel_notice_is_silenced():
    from loraforge.quant import CPU_KERNEL_LOGGER, silence_cpu_kernel_notice

    silence_cpu_kernel_notice()
    logger = logging.getLogger(CPU_KERNEL_LOGGER)
    record = logger.makeRecord(CPU_KERNEL_LOGGER, logging.WARNING, __file__, 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                               ("No module named 'kernels'",), None)
    assert not logger.filter(record)
    other = logger.makeRecord(CPU_KERNEL_LOGGER, logging.WARNING, __file__, 1, "something else", (), None)
    assert logger.filter(other)
