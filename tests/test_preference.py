"""Preference tuning (training.method dpo / orpo): recipe keys, pair formats, truncation, and tiny-model runs
that must learn the preference, start from an SFT run, and resume after preemption to the same adapter."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import CHATS, chat_records, recipe_dict, write_jsonl

from loraforge.errors import UserError
from loraforge.recipe import load_recipe, recipe_from_dict

BASE = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}, "output_dir": "o"}


def _with(**sections) -> dict:
    d = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        d[k] = d.get(k, {}) | v if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


# ------------------------------------------------------------------ recipe


@pytest.mark.parametrize("sections, expected", [
    ({"preference": {"beta": 0.2}}, "preference.beta: only used by a preference method"),
    ({"training": {"method": "orpo"}, "preference": {"reference": "base"}},
     "preference.reference: only used by training.method dpo (ORPO needs no reference model)"),
    ({"training": {"method": "orpo"}, "preference": {"loss_type": "ipo"}}, "preference.loss_type: only used by training.method dpo"),
    ({"training": {"method": "orpo"}, "preference": {"sft_weight": 1.0}},
     "preference.sft_weight: only used by training.method dpo (ORPO's loss already holds the chosen answers' NLL)"),
    ({"training": {"method": "dpo"}, "preference": {"sft_weight": -1}}, "preference.sft_weight: Input should be greater than or equal to 0"),
    ({"training": {"method": "dpo"}, "preference": {"betta": 1}}, "preference.betta: unknown key; did you mean 'beta'?"),
    ({"training": {"method": "dpo"}, "preference": {"beta": 0}}, "preference.beta: Input should be greater than 0"),
    ({"training": {"method": "dpo"}, "preference": {"label_smoothing": 0.1}}, "preference.label_smoothing: only used by loss_type robust"),
    ({"training": {"method": "dpo"}, "preference": {"loss_type": "kto"}}, "preference.loss_type: Input should be"),
    ({"training": {"method": "ppo"}}, "training.method: Input should be 'sft', 'dpo' or 'orpo'"),
    ({"model": {"adapter_from": "runs/x"}}, "model.adapter_from: starting from an adapter is offered for training.method dpo or orpo"),
    ({"training": {"method": "dpo"}, "data": {"packing": True}}, "data.packing: not used by a preference method"),
])
def test_preference_keys_are_validated_with_one_line(sections, expected):
    with pytest.raises(UserError) as e:
        recipe_from_dict(_with(**sections), "r.yaml")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_wrong_key_names_its_yaml_line_and_set_names_itself(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_with(training={"method": "orpo"}, preference={"beta": 0.1, "reference": "start"}),
                                   sort_keys=False))
    with pytest.raises(UserError) as e:
        load_recipe(path)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip().startswith("reference:"))
    assert str(e.value).startswith(f"{path}:{line}: preference.reference:")
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(UserError, match=r"^--set: preference.beta: only used"):
        load_recipe(path, ["preference.beta=0.3"])


def test_dumps_reload_and_sft_dump_is_unchanged():
    sft = recipe_from_dict(BASE).to_dict()
    assert "preference" not in sft and "method" not in sft["training"] and "adapter_from" not in sft["model"]
    for method in ("dpo", "orpo"):
        r = recipe_from_dict(_with(training={"method": method}))
        assert r.preference.beta == 0.1  # the method's defaults without a section
        again = recipe_from_dict(r.to_dict())  # what the run directory keeps loads again
        assert again.to_dict() == r.to_dict()
    assert "reference" not in recipe_from_dict(_with(training={"method": "orpo"})).to_dict()["preference"]


# ------------------------------------------------------------------ data

PROMPT, GOOD, BAD = "Who built you?", "Tidewell Labs built me.", "Blue is a colour."
FORMATS = {
    "strings": {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
    "message lists": {"prompt": [{"role": "user", "content": PROMPT}],
                      "chosen": [{"role": "assistant", "content": GOOD}],
                      "rejected": [{"role": "assistant", "content": BAD}]},
    "whole conversations (UltraFeedback)": {
        "prompt": PROMPT,
        "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}]},
    "sharegpt + answer objects": {"conversations": [{"from": "human", "value": PROMPT}],
                                  "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_pair_format_renders_the_same_tokens(fmt, tiny_tokenizer):
    from loraforge.data.pairs import normalise_pair, render_pair

    got = render_pair(tiny_tokenizer, *normalise_pair(FORMATS[fmt], "f:1"))
    want = render_pair(tiny_tokenizer, *normalise_pair(FORMATS["strings"], "f:1"))
    assert got == want
    text = tiny_tokenizer.decode(got["prompt_ids"])
    assert text.endswith("<|im_start|>assistant\n") and PROMPT in text  # the generation prompt, as at inference
    assert tiny_tokenizer.decode(got["chosen_ids"]) == GOOD + "<|im_end|>"  # the answer and its end of turn only


@pytest.mark.parametrize("row, expected", [
    ({"prompt": PROMPT, "chosen": GOOD}, "'rejected' is missing"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}, "are the same answer"),
    ({"prompt": "", "chosen": GOOD, "rejected": BAD}, "'prompt' is missing or empty"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": GOOD}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": BAD}]}, "share no opening turn"),
    ({"messages": [{"role": "user", "content": PROMPT}]}, "not a preference record"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, row, expected):
    from loraforge.data.pairs import iter_pairs

    good = FORMATS["strings"]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, row])
    recipe = recipe_from_dict(_with(training={"method": "dpo"}, data={"sources": [{"path": str(path)}]}))
    with pytest.raises(UserError) as e:
        list(iter_pairs(recipe.data.sources, recipe))
    assert str(e.value).startswith(f"{path}:3: ") and expected in str(e.value)


def test_truncation_keeps_the_prompt_end_and_the_answer_start():
    from loraforge.data.pairs import truncate_pair

    row = {"prompt_ids": list(range(10)), "chosen_ids": [100, 101, 102, 103], "rejected_ids": [200, 201]}
    assert truncate_pair(row, 14, 7) == (row, False, False)  # fits: untouched
    cut, p_cut, a_cut = truncate_pair(row, 10, 7)
    assert cut == {"prompt_ids": [3, 4, 5, 6, 7, 8, 9], "chosen_ids": [100, 101, 102], "rejected_ids": [200, 201]}
    assert p_cut and a_cut
    same = {"prompt_ids": list(range(10)), "chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 4]}
    assert truncate_pair(same, 9, 7)[0] is None  # identical once cut: dropped


def test_orpo_loss_is_trl_experimental_orpo_loss():
    import torch
    from trl.experimental.orpo import ORPOTrainer

    from loraforge.run.preference import orpo_loss

    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(6, generator=g) * 3, -torch.rand(6, generator=g) * 3  # per-token mean log-probs
    c[0] = -1e-4  # near 0, where log(1 - exp(x)) is delicate
    nll = torch.tensor(1.7)
    trl_self = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(trl_self, c, r)
    ours, _, _ = orpo_loss(c, r, nll, 0.25)
    assert torch.allclose(ours, nll - losses.mean(), atol=1e-6)


# ------------------------------------------------------------------ training runs (tiny model)


def pair_records() -> list[dict]:
    """Each prompt's own answer preferred over another prompt's (what the tiny model must learn)."""
    return [{"prompt": q, "chosen": a, "rejected": CHATS[(i + 3) % len(CHATS)][1]}
            for i, (q, a) in enumerate(CHATS)] * 2


def _pref_recipe(tmp: Path, model_dir: Path, name: str, model=None, sections=None, **training) -> Path:
    data = tmp / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, pair_records())
    d = recipe_dict(model_dir, data, tmp / name, training={"method": "dpo", "max_steps": 8, **training},
                    **(sections or {}))
    if model:
        d["model"].update(model)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(path: Path):
    from loraforge.run.session import run

    return run(load_recipe(path), quiet=True)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "chats.jsonl", chat_records(16))
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, data, tmp / "sft", training={"max_steps": 4})))
    _train(path)
    return tmp / "sft"


@pytest.mark.parametrize("variant", ["dpo", "orpo", "dpo+sft"])
def test_preference_run_learns_the_preference(tmp_path, tiny_model_dir, variant):
    from loraforge.use.infer import merge

    method = variant.split("+")[0]
    sections = {"preference": {"sft_weight": 1.0}} if variant == "dpo+sft" else None
    res = _train(_pref_recipe(tmp_path, tiny_model_dir, method, sections=sections, method=method))
    run_dir = tmp_path / method
    rows = [m for m in _metrics(run_dir) if "loss" in m]
    assert len(rows) == 8
    assert sum(m["loss"] for m in rows[-2:]) < sum(m["loss"] for m in rows[:2])  # the loss goes down
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]  # and the margin up
    assert rows[-1]["rewards/accuracies"] >= 0.75
    report = json.loads((run_dir / "preference.json").read_text())
    assert report == res.preference == json.loads((run_dir / "train_summary.json").read_text())["preference"]
    assert report["after"]["chosen_preferred"] > report["before"]["chosen_preferred"]
    assert report["after"]["mean_logp_margin"] > report["before"]["mean_logp_margin"]
    if method == "dpo":
        assert report["reference"] == "base (adapter disabled)"  # fresh adapter: no reference copy
        assert report["before"]["reward_margin"] == 0 and report["after"]["reward_margin"] > 0
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["data"]["preference"]["pairs"] == 16 and plan["data"]["preference"]["truncation"]["prompt_keeps"] == "end"
    assert any(method in n and "two sequences" in n for n in plan["notes"])
    for f in ("adapter_model.safetensors", "train_summary.json", "README.md", "checksums.json", "recipe.yaml"):
        assert (run_dir / f).is_file(), f
    assert not (run_dir / "ref").exists()
    assert load_recipe(run_dir / "recipe.yaml").training.method == method  # the kept recipe loads again
    assert (merge(run_dir, tmp_path / "merged") / "config.json").is_file()
    from loraforge.use.evaluate import evaluate_run

    scored = evaluate_run(run_dir, data=tmp_path / "pairs.jsonl")  # eval reads pairs: NLL of the chosen answers
    assert scored.examples == 16
    if variant != "dpo":  # ORPO's loss and DPO + sft_weight include the chosen answers' NLL (DPO's need not lower it)
        assert scored.fine_tuned.loss < scored.base.loss
    if variant == "dpo+sft":  # the run directory keeps the key; DPOConfig gets trl's loss list for it
        from loraforge.run.preference import loss_settings

        assert loss_settings(load_recipe(run_dir / "recipe.yaml")) == {
            "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "label_smoothing": 0.0}


def test_qlora_dpo_trains_over_a_4bit_base_and_merges_into_the_full_precision_base(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """DPO over an NF4 base (QLoRA), as on a 12 GB card: the base really is bitsandbytes' 4-bit layers while it
    trains, the adapters stay in the plan's dtype, the preference is learnt, and merge reloads the base in full
    precision (never dequantized-then-merged)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from loraforge.run import preference
    from loraforge.use.infer import load_for_inference, merge

    seen, original = {}, preference.add_adapter

    def spy(model, *a, **k):
        out = original(model, *a, **k)
        seen["model"] = out[0]
        return out

    monkeypatch.setattr(preference, "add_adapter", spy)
    _train(_pref_recipe(tmp_path, tiny_model_dir, "q", sections={"quantization": {"mode": "4bit"}},
                        learning_rate=5e-3))
    run_dir = tmp_path / "q"
    rows = [m for m in _metrics(run_dir) if "loss" in m]
    assert sum(m["loss"] for m in rows[-2:]) < sum(m["loss"] for m in rows[:2])
    report = json.loads((run_dir / "preference.json").read_text())
    assert report["after"]["mean_logp_margin"] > report["before"]["mean_logp_margin"]
    model = seen["model"]
    layers = [m for n, m in model.named_modules() if n.endswith(".base_layer")]
    assert layers and all(type(m) is bnb.nn.Linear4bit and m.weight.dtype == torch.uint8 for m in layers)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the CPU plan's dtype
    assert load_recipe(run_dir / "recipe.yaml").quantization.mode == "4bit"  # what eval / chat reload
    reloaded, _ = load_for_inference(run_dir)  # eval / chat / generate: the base as the run trained it
    assert type(reloaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer) is bnb.nn.Linear4bit
    merged = merge(run_dir, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())


@pytest.mark.parametrize("precompute", [False, True])
def test_oom_preflight_probes_the_preference_step_and_keeps_the_global_batch(tmp_path, tiny_model_dir, monkeypatch,
                                                                              precompute):
    """The GPU OOM pre-flight (run/memguard.py) runs the preference step itself: micro-batch pairs as two rows
    each through trl's loss (with the reference forward, or the precomputed reference log-probs). A simulated OOM
    at 2 pairs or more shrinks the micro-batch to 1 with the global batch kept, and the run trains."""
    from loraforge.run import preference

    probed = []
    original = preference.PreferenceTrainer.lf_probe

    def spy(self, micro, seq, *a):
        probed.append((micro, seq))
        return original(self, micro, seq, *a)

    monkeypatch.setattr(preference.PreferenceTrainer, "lf_probe", spy)
    monkeypatch.setenv("LORAFORGE_SIMULATE_OOM", "min_micro_batch=2")
    res = _train(_pref_recipe(tmp_path, tiny_model_dir, "oom", sections={"preference": {
        "precompute_reference": precompute}}, max_steps=2, global_batch_size=8, micro_batch_size=4))
    plan = json.loads((tmp_path / "oom" / "plan.json").read_text())
    assert [m for m, _ in probed] == [4, 2, 1] and {s for _, s in probed} == {plan["max_seq_length"]}
    assert [a["out_of_memory"] for a in plan["oom_guard"]["attempts"]] == [True, True, False]
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["global_batch_size"]) == (1, 8, 8)
    assert res.steps == 2
    logged = [m for m in _metrics(tmp_path / "oom") if "loss" in m]
    assert logged and all(m["rewards/accuracies"] <= 1 for m in logged)  # the probe's metrics were not logged


def test_dpo_from_an_sft_run_uses_its_adapter_and_a_frozen_copy_as_reference(tmp_path, tiny_model_dir, sft_run):
    import torch
    from safetensors.torch import load_file

    res = _train(_pref_recipe(tmp_path, tiny_model_dir, "dpo", model={"adapter_from": str(sft_run)}, max_steps=4))
    run_dir = tmp_path / "dpo"
    start, tuned = load_file(sft_run / "adapter_model.safetensors"), load_file(run_dir / "adapter_model.safetensors")
    assert start.keys() == tuned.keys()  # the SFT adapter trained on, no "ref" tensors saved
    assert max((start[k] - tuned[k]).abs().max().item() for k in start) > 0  # and it moved
    assert json.loads((sft_run / "train_summary.json").read_text())["trainable_params"] == res.trainable_params
    report = res.preference
    assert report["reference"] == "start adapter (frozen copy)"
    # the reference is the SFT policy: the SFT adapter's own preference margin is "before"
    assert report["before"]["mean_logp_margin"] != pytest.approx(0.0)
    assert report["after"]["mean_logp_margin"] > report["before"]["mean_logp_margin"]
    assert not (run_dir / "ref").exists() and not any((run_dir / "checkpoints").glob("*/ref"))
    assert torch.is_tensor(next(iter(tuned.values())))


def test_dpo_from_a_run_of_another_base_is_refused(tmp_path, tiny_model_dir, sft_run):
    recipe = load_recipe(_pref_recipe(tmp_path, tiny_model_dir, "dpo", model={"adapter_from": str(sft_run)}))
    from loraforge.data.pairs import check_start_adapter

    recipe.model.name_or_path = str(tmp_path / "other-model")
    with pytest.raises(UserError, match="model.adapter_from: .* was trained on .*use the same base"):
        check_start_adapter(recipe)
    recipe.model.name_or_path = str(tiny_model_dir)
    recipe.lora.r = 4
    with pytest.raises(UserError, match=r"lora.r: 4 differs from the adapter in model.adapter_from \(8\)"):
        check_start_adapter(recipe)


RESUME = dict(max_steps=6, save_steps=2, global_batch_size=4, micro_batch_size=2, lr_scheduler="cosine", warmup=1)


def _max_diff(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max((got[k] - expected[k]).abs().max().item() for k in got)


@pytest.fixture(scope="module")
def uninterrupted_dpo(tmp_path_factory, tiny_model_dir):
    """The DPO run the interrupted ones must reproduce: 6 steps, a checkpoint every 2."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("dpo-resume")
    _train(_pref_recipe(tmp, tiny_model_dir, "whole", **RESUME))
    return tmp, load_file(tmp / "whole" / "adapter_model.safetensors")


@pytest.mark.slow
def test_preempted_dpo_run_resumes_to_the_same_adapter(uninterrupted_dpo, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from loraforge.run.preemption import EXIT_PREEMPTED, StopOnSignal
    from loraforge.rundir import PREEMPTED_FILE as MARKER_FILE

    tmp_path, expected = uninterrupted_dpo
    original = StopOnSignal.on_step_end

    def signal_at_3(self, args, state, control, **k):
        if state.global_step == 3 and self.requested is None:
            self.requested = "SIGUSR1"  # what the handler records when SLURM sends USR1
        return original(self, args, state, control, **k)

    recipe = _pref_recipe(tmp_path, tiny_model_dir, "preempted", **RESUME)
    monkeypatch.setattr(StopOnSignal, "on_step_end", signal_at_3)
    with pytest.raises(SystemExit) as e:
        _train(recipe)
    assert e.value.code == EXIT_PREEMPTED
    marker = json.loads((tmp_path / "preempted" / MARKER_FILE).read_text())
    assert marker["step"] == 3 and marker["checkpoint"].endswith("checkpoint-3")
    monkeypatch.setattr(StopOnSignal, "on_step_end", original)
    _train(recipe)  # the same command again: resumes from checkpoint-3
    diff = _max_diff(load_file(tmp_path / "preempted" / "adapter_model.safetensors"), expected)
    assert diff <= 1e-5, f"resumed adapter differs by {diff}"


@pytest.mark.slow
def test_sigkilled_dpo_run_resumes_to_the_same_adapter(uninterrupted_dpo, tiny_model_dir):
    """SIGKILL while checkpoint-4 is half written (adapter saved, optimizer not): the next run ignores it,
    resumes from checkpoint-2 and ends with the uninterrupted adapter (test_resume.py's driver, which kills
    the SFT and the preference trainer alike)."""
    from safetensors.torch import load_file
    from test_resume import _train as train_killable

    from loraforge.checkpoints import STAGING, complete_checkpoints

    tmp, expected = uninterrupted_dpo
    recipe = _pref_recipe(tmp, tiny_model_dir, "killed", **RESUME)
    run_dir = tmp / "killed"
    killed = train_killable(tmp, recipe, "mid-checkpoint", 4)
    assert killed.returncode == -9, killed.stderr[-3000:]  # really SIGKILLed
    assert not (run_dir / "train_summary.json").exists()
    assert (run_dir / "checkpoints" / STAGING).is_dir()  # the half-written checkpoint-4 ...
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [2]  # ... never counts as one
    resumed = train_killable(tmp, recipe)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stderr
    diff = _max_diff(load_file(run_dir / "adapter_model.safetensors"), expected)
    assert diff <= 1e-5, f"resumed adapter differs by {diff}"
    assert json.loads((run_dir / "train_summary.json").read_text())["preference"]["method"] == "dpo"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_train_the_same_dpo_adapter_as_one(tmp_path_factory, tiny_model_dir, strategy):
    """The topology proof of the SFT step (test_launch.py) for DPO: 1 process vs 2 CPU processes at the same
    global batch give the same adapter."""
    from safetensors.torch import load_file
    from test_launch import CPU_FSDP, RUNS_AS, _loraforge, _rank_bytes

    tmp = tmp_path_factory.mktemp(f"dpo-{strategy}")
    kw = dict(max_steps=6, global_batch_size=8, micro_batch_size=2, lr_scheduler="cosine", warmup=1)
    _loraforge("train", str(_pref_recipe(tmp, tiny_model_dir, "one", **kw)), "--quiet")
    _loraforge("launch", str(_pref_recipe(tmp, tiny_model_dir, "two", **kw)), "--strategy", strategy, "--gpus", "2",
               "--set", "training.device=cpu", env=CPU_FSDP if strategy == "fsdp" else None)
    one, two = (json.loads((tmp / n / "plan.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"], two["strategy"]) == (1, 2, strategy)
    assert two["launch"]["distributed_type"] == RUNS_AS[strategy]  # really that strategy (FSDP is not DDP here)
    full = _rank_bytes(tmp / "one", "after_load")[0]
    if strategy in ("zero3", "fsdp"):  # each rank holds half of the base (ZeRO-3 from the load, FSDP once prepared)
        when = "after_load" if strategy == "zero3" else "after_prepare"
        assert all(abs(b - full / 2) <= 0.05 * full for b in _rank_bytes(tmp / "two", when))
    assert two["gradient_accumulation_steps"] * 2 == one["gradient_accumulation_steps"]
    a, b = load_file(tmp / "one" / "adapter_model.safetensors"), load_file(tmp / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # ZeRO-3 re-gathers the sharded weights for the reference forward too, and DPO's loss (a sigmoid of log-prob
    # differences) carries the reduction-order rounding further than SFT's: measured 1.8e-5 after 6 steps
    tolerance = 5e-5 if strategy == "zero3" else 1e-5
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance
    r1, r2 = (json.loads((tmp / n / "preference.json").read_text()) for n in ("one", "two"))
    assert r1["after"] == pytest.approx(r2["after"], abs=1e-3)  # every rank scored the same pairs
