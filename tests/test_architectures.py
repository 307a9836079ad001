"""Any decoder architecture plans: the inventory from config.json (family rules = the real transformers class on
the meta device), the activation model against the FakeTensorMode trace for every family, one-line refusals for
what cannot be planned, and `loraforge plan` for Qwen3, Gemma, Phi and MoE configs. Configs are hand-written
from the models' published config.json facts (tests/fixtures/configs, tests/arch_fixtures.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from arch_fixtures import SMALL_CONFIGS
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import UserError
from loraforge.plan import arch
from loraforge.plan.memory import TrainSetup, estimate, shape_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "fixtures" / "configs"
runner = CliRunner()


def config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


# ------------------------------------------------------------------ the inventory


def test_family_rules_are_exactly_the_meta_device_model():
    """Torch-free rules and the real model class on the meta device agree on every field, for every fixture config
    of a ruled family; the parameter count is the meta model's exactly."""
    checked = 0
    for d in sorted(CONFIGS.iterdir()):
        cfg = config(d.name)
        if cfg["model_type"] not in arch.FAMILIES:
            continue
        rules, meta = arch.rules_inventory(cfg), arch.meta_inventory(cfg, use_cache=False)
        total = meta.pop("total_params")
        diff = {k: (rules[k], meta[k]) for k in meta if k != "source" and json.dumps(rules[k]) != json.dumps(meta[k])}
        assert not diff, (d.name, diff)
        assert shape_from_config(cfg).total_params == total, d.name
        checked += 1
    assert checked >= 18


@pytest.mark.parametrize("name, billions, lora_m", [
    ("qwen3-4b", 4.022, 33.030144),  # model card: 4.0B
    ("qwen3-8b", 8.191, 43.646976),  # 8.2B
    ("qwen3-30b-a3b", 30.532, None),  # 30.5B total, 3.3B active
    ("mixtral-8x7b-instruct", 46.703, None),  # 46.7B
    ("gemma-2-9b-it", 9.242, 54.018048),  # 9.24B
    ("gemma-3-1b-it", 1.000, 13.04576),  # 1B
    ("phi-3-mini-4k-instruct", 3.821, 25.165824),  # 3.8B
    ("phi-4", 14.660, 55.7056),  # 14.7B
    ("mistral-nemo-instruct-2407", 12.248, 57.01632),  # 12.2B
    ("smollm2-1.7b-instruct", 1.711, 18.087936),  # 1.7B
    ("llama-3.2-3b-instruct", 3.213, 24.313856),  # 3.2B
])
def test_parameter_counts_of_the_families(name, billions, lora_m):
    """Totals as the model cards round them; LoRA counts as peft's get_nb_trainable_parameters printed for r=16
    all-linear on the meta-device model (run once by hand, transformers 5.24 / peft 0.21)."""
    s = shape_from_config(config(name), name)
    assert s.total_params / 1e9 == pytest.approx(billions, abs=0.001)
    if lora_m:
        assert s.lora_params(16, "all-linear") / 1e6 == pytest.approx(lora_m, abs=1e-6)


def test_what_the_inventory_sees():
    phi = shape_from_config(config("phi-3-mini-4k-instruct"))
    assert set(phi.linears()) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # fused: one adapter each
    assert phi.sliding_window == 2047 and phi.sliding_layers == 32
    g2 = shape_from_config(config("gemma-2-9b-it"))
    assert (g2.tied, g2.vocab, g2.norms_per_layer, g2.eager_only, g2.attn_softcap) == (True, 256000, 4, True, True)
    assert g2.sliding_layers == 21  # alternating sliding / global
    g3 = shape_from_config(config("gemma-3-1b-it"))
    assert g3.qk_norm and g3.rope_sets == 2 and g3.sliding_layers == 26 - 26 // 6 and g3.vocab == 262144
    moe = shape_from_config(config("qwen3-30b-a3b"))
    assert (moe.experts, moe.experts_per_token, moe.expert_intermediate) == (128, 8, 768)
    assert set(moe.linears()) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # experts are 3-D parameters
    # all experts' weights are resident: 48 layers x 128 experts x 3 x 2048 x 768
    assert moe.layers * moe.expert_params_per_layer == 48 * 128 * 3 * 2048 * 768


def test_an_unruled_family_plans_from_the_meta_device_model_and_is_cached(tmp_path, monkeypatch):
    """Granite-3.0-1B-A400M (granitemoe) has no family rule: the real class is built on the meta device once, then
    read from the cache without torch."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    cfg = config("granite-3.0-1b-a400m-instruct")
    s = shape_from_config(cfg, "granite")
    assert s.source == "meta" and s.total_params / 1e9 == pytest.approx(1.3346, abs=0.0005)  # model card: 1.3B
    assert (s.experts, s.experts_per_token, s.expert_intermediate) == (32, 8, 512)
    assert list((tmp_path / "inventory").glob("granitemoe-*.json"))
    code = ("import json, sys, time; from loraforge.plan.memory import shape_from_config; t = time.time(); "
            f"s = shape_from_config(json.load(open({str(CONFIGS / 'granite-3.0-1b-a400m-instruct' / 'config.json')!r}))); "
            "print('torch' in sys.modules, s.source, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "LORAFORGE_CACHE": str(tmp_path)}).stdout.split()
    assert out[:2] == ["False", "meta"]  # no torch import: milliseconds (measured in the README)


@pytest.mark.parametrize("cfg, says", [
    ({"model_type": "t5", "is_encoder_decoder": True, "d_model": 512}, "'t5' is an encoder-decoder model"),
    ({"model_type": "acme_lm", "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}, "hidden_size": 8},
     "'acme_lm' is remote code"),
    ({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
      "intermediate_size": 128}, "'vit' has no causal-LM class"),
    ({"model_type": "nonesuch", "hidden_size": 8}, "does not know model_type 'nonesuch'"),
])
def test_unplannable_architectures_get_one_line_saying_why_and_what_to_set(cfg, says):
    with pytest.raises(UserError) as e:
        shape_from_config(cfg)
    msg = str(e.value)
    assert says in msg and "set training.micro_batch_size / gradient_accumulation_steps" in msg and "\n" not in msg


def test_plan_cli_refuses_an_encoder_decoder_in_one_line(tmp_path):
    path = _recipe(tmp_path, "qwen3-4b-lora", "t5-small")
    result = runner.invoke(app, ["plan", str(path), "--hardware", "rtx3060-12gb"])
    assert result.exit_code == 2
    assert "encoder-decoder" in result.output and "Traceback" not in result.output


def test_settings_this_stack_cannot_train_are_refused_not_planned(tmp_path):
    for overrides, says in [
        (["quantization.mode=4bit"], "the experts are 3-D parameters"),
        (["lora.target_modules=all-linear"], "LoRA on every expert's 3-D weights"),
    ]:
        result = runner.invoke(app, ["plan", str(_recipe(tmp_path, "qwen3-30b-a3b-lora", "qwen3-30b-a3b")),
                                     "--hardware", "a100-80gb", *sum((["--set", o] for o in overrides), [])])
        assert result.exit_code == 2 and says in result.output, result.output
    result = runner.invoke(app, ["plan", str(_recipe(tmp_path, "qwen3-4b-lora", "phi-4")), "--hardware", "a100-80gb",
                                 "--set", "lora.target_modules=[q_proj,v_proj]"])
    assert result.exit_code == 2
    assert "q_proj, v_proj not in this model" in result.output and "('phi3')" in result.output and "qkv_proj" in result.output


# ------------------------------------------------------------------ the activation model against the trace


TRACED = [  # family, quantization, checkpointing, micro-batch, sequence, LoRA targets
    ("llama", "4bit", False, 2, 1024, "all-linear"),
    ("qwen3", "none", False, 1, 2048, "all-linear"),
    ("qwen3_moe", "none", False, 1, 2048, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("mixtral", "none", True, 2, 1024, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("gemma2", "none", True, 2, 1024, "all-linear"),
    ("gemma3_text", "4bit", False, 2, 1024, "all-linear"),
    ("phi3", "none", False, 4, 1024, "all-linear"),
    ("mistral", "none", False, 1, 2048, "all-linear"),
    ("smollm3", "4bit", False, 2, 1024, "all-linear"),
]


@pytest.mark.parametrize("family, quant, gc, mb, seq, targets", TRACED)
def test_analytic_model_is_within_5_percent_of_the_trace_and_never_under(family, quant, gc, mb, seq, targets):
    from loraforge.model.trace import trace_step

    shape = shape_from_config(SMALL_CONFIGS[family], family)
    setup = TrainSetup(micro_batch=mb, seq_len=seq, gradient_checkpointing=gc, quant=quant, lora_targets=targets)
    traced = trace_step(shape, setup)
    analytic = estimate(shape, setup).tensor_peak
    assert 1.0 <= analytic / traced.peak_bytes <= 1.05, (family, analytic / 2**30, traced.to_dict())


# ------------------------------------------------------------------ `loraforge plan` for the new families


def _recipe(tmp_path: Path, recipe: str, cfg: str) -> Path:
    d = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    d["model"]["name_or_path"] = str(CONFIGS / cfg)
    path = tmp_path / f"{recipe}-{cfg}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


DONE_WHEN = [  # the "done when": a Qwen3, a Gemma, a Phi and an MoE on an rtx3060-12gb and 8x a100-80gb
    ("qwen3-4b-qlora", "qwen3-4b"),
    ("gemma-2-2b-qlora", "gemma-2-2b-it"),
    ("qwen3-4b-lora", "gemma-3-1b-it"),
    ("qwen3-4b-qlora", "phi-3-mini-4k-instruct"),
    ("granite-3.0-1b-a400m-lora", "granite-3.0-1b-a400m-instruct"),
    ("qwen3-30b-a3b-lora", "qwen3-30b-a3b"),
]


@pytest.mark.parametrize("recipe, cfg", DONE_WHEN)
@pytest.mark.parametrize("hardware", [["--hardware", "rtx3060-12gb"], ["--hardware", "a100-80gb", "--gpus", "8"]])
def test_done_when_plans_fit_and_explain(tmp_path, recipe, cfg, hardware, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    if cfg == "qwen3-30b-a3b" and "rtx3060-12gb" in hardware:
        pytest.skip("30B of bf16 experts (QLoRA cannot quantize them) do not fit 12 GB; checked below")
    result = runner.invoke(app, ["plan", str(_recipe(tmp_path, recipe, cfg)), "--json", *hardware])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["fits"] and out["predicted_peak_gib"] <= out["budget_gib"], out
    assert out["global_batch_size"] == out["requested_global_batch_size"]
    assert any("gradient checkpointing auto ->" in n for n in out["notes"])
    assert sum(out["breakdown"].values()) == pytest.approx(out["predicted_peak_gib"], abs=0.01)


def test_moe_that_does_not_fit_says_what_would(tmp_path):
    result = runner.invoke(app, ["plan", str(_recipe(tmp_path, "qwen3-30b-a3b-lora", "qwen3-30b-a3b")), "--json",
                                 "--hardware", "rtx3060-12gb"])
    out = json.loads(result.output)
    assert not out["fits"] and out["breakdown"]["base_weights"] > 56  # GiB: every expert resident, in bf16
    assert any(s.startswith("more GPUs:") for s in out["suggestions"])


def test_plan_for_a_70b_config_and_a_new_family_needs_no_torch(tmp_path):
    for recipe, cfg in [("llama-3-70b-qlora", "llama-3-70b-instruct"), ("qwen3-4b-qlora", "gemma-2-9b-it")]:
        code = ("import sys, time; t = time.time(); sys.argv = ['loraforge', 'plan', sys.argv[1], '--hardware', "
                "'a100-80gb', '--gpus', '8', '--json']\nfrom loraforge.cli import main\ntry: main()\n"
                "except SystemExit: pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.time() - t)")
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", code, str(_recipe(tmp_path, recipe, cfg))], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        flag, seconds = proc.stdout.strip().splitlines()[-1].split()
        assert flag == "NO-TORCH", (cfg, flag, seconds, time.time() - t0)  # what keeps it well under a second


# ------------------------------------------------------------------ attention


def test_gemma2_with_sdpa_is_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["plan", str(_recipe(tmp_path, "gemma-2-2b-qlora", "gemma-2-9b-it")), "--hardware",
                                 "a100-80gb", "--set", "model.attn_implementation=sdpa"])
    assert result.exit_code == 2 and "set model.attn_implementation: eager" in result.output
