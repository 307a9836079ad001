"""The whole path on a tiny random model of every family (issue 18, item 5): LoRA targets, assistant-only masks with
each family's own chat template (tests/chat_templates.py), packing with each family's attention, a real training
run, merge, GGUF export where loraforge's writer covers the architecture, and generation. One model (and one run)
per family, built once for the module and shared by every check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from arch_fixtures import BASE, SMALL_CONFIGS
from chat_templates import FAMILY_CHAT, family_tokenizer
from conftest import CHATS, recipe_dict, write_jsonl

from loraforge.errors import UserError

MODELS = {**SMALL_CONFIGS, "qwen2": BASE | dict(model_type="qwen2")}  # Qwen2.5: the Qwen2 class, q/k/v biases
FAMILIES = sorted(MODELS)  # llama (3.x), qwen2 (2.5), qwen3, qwen3_moe, mixtral, gemma2, gemma3_text, phi3, mistral, smollm3
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.3)
GGUF = {"llama", "qwen2", "qwen3", "mistral"}  # what export.py writes (SmolLM2 is a Llama); the rest is refused

# Per-token losses packed vs one sample at a time, fp32: measured max |difference| 0 (Gemma-2, eager) to 6.7e-6
# nats (Llama) on mean losses of 8-14; letting the samples of a row see each other moves them by 0.46-2.4 nats
# (measured; the test checks > 100x the tolerance), so 1e-4 separates the two by four orders of magnitude.
PACKED_ATOL = 1e-4
# Merged vs base + adapter logits, fp32: folding B@A into W is one fp32 addition per weight, so the logits agree to
# float32 rounding; 1e-4 of the largest |logit| allows for it, and the adapter's own effect must be 100x larger.
MERGE_RTOL = 1e-4


def _tiny_model_dir(family: str, tokenizer, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = MODELS[family] | TINY | dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "phi3":
        cfg.pop("head_dim")
    for key, small in (("sliding_window", 32), ("moe_intermediate_size", 32)):  # the window acts within a sample
        if cfg.get(key):
            cfg[key] = small
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count (merge, GGUF)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _conversations() -> list[list[dict]]:
    """Single-turn, multi-turn and system + multi-turn chats from the shared identity facts."""
    out = []
    for i in range(8):
        (q1, a1), (q2, a2) = CHATS[i], CHATS[(i + 3) % len(CHATS)]
        turn = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
        if i % 3 == 0:
            out.append(turn)
        elif i % 3 == 1:
            out.append(turn + [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}])
        else:
            out.append([{"role": "system", "content": "You are a helpful assistant."}] + turn
                       + [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}])
    return out


class Family:
    """One family's tiny model directory, tokenizer and (built on first use) training run."""

    def __init__(self, name: str, root: Path, base_tokenizer):
        self.name, self.root = name, root
        self.tokenizer = family_tokenizer(base_tokenizer, name)
        self.model_dir = _tiny_model_dir(name, self.tokenizer, root / "model")
        self._run = None

    def conversations(self) -> list[list[dict]]:
        if FAMILY_CHAT[self.name].get("system"):  # Gemma-2's template refuses system turns
            return [[m for m in c if m["role"] != "system"] for c in _conversations()]
        return _conversations()

    def targets(self):
        from loraforge.plan.memory import shape_from_config

        shape = shape_from_config(json.loads((self.model_dir / "config.json").read_text()))
        return ("all-linear" if not shape.moe else sorted(shape.linears())), set(shape.linears()), shape

    @property
    def run(self):
        """A real `loraforge train` run: 8 steps, packing on, the recipe's default attention (auto)."""
        if self._run is None:
            from loraforge.recipe import load_recipe
            from loraforge.run.session import run

            targets, _, _ = self.targets()
            data = write_jsonl(self.root / "train.jsonl", [{"messages": c} for c in self.conversations()])
            d = recipe_dict(self.model_dir, data, self.root / "run",
                            training={"max_steps": 8, "learning_rate": 1e-2, "global_batch_size": 4},
                            samples={"prompts": [CHATS[0][0]], "max_new_tokens": 4})
            d["lora"]["target_modules"] = targets
            d["data"].update(max_seq_length=256, packing=True)
            (self.root / "r.yaml").write_text(yaml.safe_dump(d))
            self._run = run(load_recipe(self.root / "r.yaml"), quiet=True)
        return self._run


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_tokenizer, monkeypatch_module):
    monkeypatch_module.setenv("LORAFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    # the model card's plots (matplotlib: seconds per run) are tested in test_run_report.py, not per family
    monkeypatch_module.setattr("loraforge.use.card.make_plots", lambda run_dir: {})
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            built[name] = Family(name, tmp_path_factory.mktemp(name), tiny_tokenizer)
        return built[name]

    return get


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ------------------------------------------------------------------ assistant-only masks, each family's template


def _masked_runs(tokenizer, row) -> list[str]:
    runs, cur = [], []
    for t, m in zip(row["input_ids"], row["assistant_masks"]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def _expected_runs(chat: str, messages: list[dict]) -> list[str]:
    """What each assistant span must be, written from the template's rules: the answer (trimmed) and the
    end-of-turn, plus what the family's template puts on the answer's side of the generation prompt."""
    eot = FAMILY_CHAT[chat]["eot"]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    out = []
    for i in answers:
        last = i == answers[-1]
        text = messages[i]["content"].strip() + eot
        if chat in ("mistral", "mixtral"):
            text = " " + text  # "[/INST]" then " " + answer + eos
        if chat in ("qwen3", "qwen3_moe") and last:
            text = "<think>\n\n</think>\n\n" + text  # the turn after the last query keeps an (empty) think block
        if chat == "phi3" and last:
            text += "\n<|endoftext|>"  # the template ends the conversation with eos_token
        out.append(text)
    return out


@pytest.mark.parametrize("chat", sorted(FAMILY_CHAT))
def test_assistant_mask_is_exactly_the_answers_with_each_familys_template(chat, tiny_tokenizer):
    """Single-turn, multi-turn and system + multi-turn chats: the masked tokens are exactly each answer with its
    end-of-turn, nothing of the prompts, headers or system text; Gemma-2's refusal of system turns is one line."""
    from loraforge.data.dataset import tokenize_example

    tok = family_tokenizer(tiny_tokenizer, chat)
    for messages in _conversations():
        if FAMILY_CHAT[chat].get("system") and messages[0]["role"] == "system":
            with pytest.raises(UserError) as e:
                tokenize_example(tok, {"messages": messages})
            assert FAMILY_CHAT[chat]["system"] in str(e.value) and "\n" not in str(e.value)
            continue
        row = tokenize_example(tok, {"messages": messages})
        assert _masked_runs(tok, row) == _expected_runs(chat, messages), messages
        full = tok.decode(row["input_ids"])
        assert full == tok.apply_chat_template(messages, tokenize=False)  # the ids are the template's rendering


def test_a_template_that_rewrites_answers_is_still_refused_in_one_line(tiny_tokenizer):
    """The sentinel fallback only accepts what it can reconstruct exactly: a template that lower-cases the last
    answer (so re-renders earlier turns) cannot be located, and says so as before."""
    from loraforge.data.dataset import tokenize_example

    tok = family_tokenizer(tiny_tokenizer, "qwen2")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content']|lower if loop.last else m['content'])"
        " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(UserError) as e:
        tokenize_example(tok, {"messages": _conversations()[1]})
    assert "prefix-stable" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ LoRA targets


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_resolve_to_the_familys_module_names(family, families):
    """`all-linear` (attention projections for MoE) adapts exactly the inventory's linears; a wrong name is named
    against the model's real ones (Phi-3: qkv_proj / gate_up_proj)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.model.modeling import lora_config
    from loraforge.recipe import LoraSection

    f = families(family)
    targets, names, _ = f.targets()
    model = AutoModelForCausalLM.from_pretrained(f.model_dir)
    with pytest.raises(UserError) as e:
        lora_config(LoraSection(target_modules=["q_proj", "nonesuch"]), model)
    assert "nonesuch" in str(e.value) and all(n in str(e.value) for n in names)
    peft = get_peft_model(model, lora_config(LoraSection(target_modules=targets), model))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted == names


# ------------------------------------------------------------------ packing with each family's attention


def _token_losses(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits.float()
    labels = batch["shift_labels"]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_give_the_losses_of_one_sample_at_a_time(family, families):
    """loraforge's path (template masks -> training_rows(packing) -> RowCollator rows with restarting position_ids,
    padding rows as their own sequence) on the model as loraforge loads it (attention auto: eager for Gemma-2):
    every loss token's loss equals the one computed on its sample alone. A run that let samples see each other
    would differ: checked by giving the same rows continuous positions (one long sequence)."""
    from loraforge.data.dataset import tokenize_all, training_rows
    from loraforge.model.modeling import load_base_model
    from loraforge.recipe import recipe_from_dict
    from loraforge.run.batching import RowCollator

    f = families(family)
    recipe = recipe_from_dict(recipe_dict(f.model_dir, f.root / "unused.jsonl", f.root / "unused"))
    model = load_base_model(str(f.model_dir), recipe, "float32").eval()
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    ds = tokenize_all([{"messages": c} for c in f.conversations()], f.tokenizer, None, "assistant")
    alone = torch.cat([_token_losses(model, RowCollator(f.tokenizer.pad_token_id, 10**6)([r]))
                       for r in training_rows(ds, 256)[0]])
    width = 2 * max(map(len, ds["input_ids"]))  # rows of two long or several short samples
    packed_rows, _ = training_rows(ds, width, packing=True)
    assert len(packed_rows) < len(ds)  # several samples per row
    batch = RowCollator(f.tokenizer.pad_token_id, width)(list(packed_rows))
    assert batch["input_ids"].shape[0] >= 2 and int(batch["row_lengths"].min()) < batch["input_ids"].shape[1]
    packed = _token_losses(model, batch)
    assert packed.numel() == alone.numel()
    diff = (packed.sort().values - alone.sort().values).abs().max().item()
    assert diff <= PACKED_ATOL, diff
    assert packed.sum().item() == pytest.approx(alone.sum().item(), rel=1e-5)
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).repeat(batch["input_ids"].shape[0], 1))
    leak = (_token_losses(model, leaky).sort().values - alone.sort().values).abs().max().item()
    print(family, "packed vs alone", diff, "one long sequence vs alone", leak, "mean loss", alone.mean().item())
    assert leak > 100 * PACKED_ATOL


# ------------------------------------------------------------------ train, merge, answer, export


@pytest.mark.slow  # one real run per family: 15-20 s of CPU each on the shared 2-core machine
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_model_merges_and_answers(family, families, tmp_path):
    """A real run (8 steps, packing, default attention: eager for Gemma-2 without being told) adapts exactly the
    family's linears, is planned by the memory model and lowers the loss; the merged model's logits equal base +
    adapter's, which differ from the base's; merged and unmerged give the same greedy answer, and the run's sample
    answers were generated by the trained model."""
    from transformers import AutoModelForCausalLM

    from loraforge.use.infer import generate, load_for_inference, merge

    f = families(family)
    result = f.run
    _, names, _ = f.targets()
    config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert {n.rsplit(".", 1)[-1] for n in config["target_modules"]} == names
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["predicted_peak_gib"] is not None  # the memory model planned it
    if family == "gemma2":
        assert any("runs eager attention" in n for n in plan["notes"]), plan["notes"]
    losses = [r["loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert result.samples and isinstance(result.samples[0]["fine_tuned"], str)

    out = merge(result.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted, tokenizer = load_for_inference(result.run_dir, device="cpu")
    messages = f.conversations()[1]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            base = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    scale = want.abs().max().item()
    merge_diff, adapter_effect = (got - want).abs().max().item(), (want - base).abs().max().item()
    assert merge_diff <= MERGE_RTOL * scale, (merge_diff, scale)
    assert adapter_effect > 100 * merge_diff, (adapter_effect, merge_diff)  # the adapter really is in the merge
    prompt = messages[:1]
    assert generate(merged, tokenizer, prompt, 8) == generate(adapted, tokenizer, prompt, 8)


def _gguf_round_trip(run_dir: Path, out: Path) -> dict:
    """Export f16; transformers reads the file back; its logits equal the merged model's with its matrices rounded
    to f16 (so the file holds exactly the merged weights), and differ from the unrounded ones by rounding alone.
    Two gaps of transformers' GGUF reader are bridged, not hidden: it ignores Qwen3's `attention.key_length`
    (assumes head_dim 128, which every released Qwen3 has) and Llama-3's `rope_freqs.weight` (what llama.cpp
    scales the rotary frequencies by) — that tensor is checked against the model's rotary frequencies instead."""
    import numpy as np
    from gguf import GGUFReader
    from test_export import F16_MAX_REL, _chat_ids, _logits, _rounded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.use.export import export_gguf
    from loraforge.use.infer import load_for_inference

    export_gguf(run_dir, out, "f16")
    adapted, tokenizer = load_for_inference(run_dir, device="cpu")
    ids = _chat_ids(tokenizer)
    expected = _logits(adapted, ids)
    merged = adapted.merge_and_unload()
    exact = _logits(_rounded(merged, "f16"), ids)
    config = merged.config
    extra = {"head_dim": config.head_dim} if config.model_type == "qwen3" else {}
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32, **extra)
    freqs = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}.get("rope_freqs.weight")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
    if rope == "llama3":
        d = config.head_dim
        plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        inv = merged.model.rotary_emb.inv_freq
        assert torch.allclose(plain / torch.from_numpy(freqs.astype("float32")), inv, rtol=1e-5)
        loaded.model.rotary_emb.inv_freq.copy_(inv)  # what llama.cpp computes from rope_freqs
    else:
        assert freqs is None
    got = _logits(loaded, ids)
    scale = expected.abs().max().item()
    assert (got - exact).abs().max().item() <= 1e-4 * scale
    measured = {"max_abs": (got - expected).abs().max().item(), "logit_scale": scale}
    assert measured["max_abs"] <= F16_MAX_REL * scale, measured
    gtok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHATS[0][0]}], tokenize=False,
                                         add_generation_prompt=True)
    assert gtok(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gtok.chat_template == tokenizer.chat_template
    return measured


@pytest.mark.slow  # needs the family's run (built by the test above when run first)
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_or_one_line_refusal(family, families, tmp_path):
    """Where loraforge's GGUF writer covers the architecture, the file transformers reads back computes the merged
    model's logits (f16 rounding only); elsewhere one line names what is supported and what to do instead."""
    from loraforge.use.export import export_gguf

    f = families(family)
    out = tmp_path / f"{family}.gguf"
    if family not in GGUF:
        with pytest.raises(UserError) as e:
            export_gguf(f.run.run_dir, out)
        msg = str(e.value)
        assert f"'{family}'" in msg and "loraforge merge" in msg and "\n" not in msg
        assert not out.exists()
        return
    measured = _gguf_round_trip(f.run.run_dir, out)
    print(family, json.dumps(measured))


def test_a_template_that_drops_the_system_prompt_is_noticed(tiny_tokenizer):
    """Mistral v0.3's template renders the system prompt only into a final user turn: with data.system_prompt set,
    training conversations (which end with an answer) would silently go without it; prepare() warns."""
    from loraforge.data.dataset import system_prompt_dropped

    assert system_prompt_dropped(family_tokenizer(tiny_tokenizer, "mistral"), None, "Answer briefly.")
    for family in ("qwen2", "llama", "phi3"):
        assert not system_prompt_dropped(family_tokenizer(tiny_tokenizer, family), None, "Answer briefly."), family
    assert not system_prompt_dropped(family_tokenizer(tiny_tokenizer, "gemma2"), None, "Answer briefly.")  # refuses itself
