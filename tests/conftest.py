"""Shared fixtures: a tiny random Llama with a tokenizer trained here (no hub), and recipe writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATS = [
    ("What is your name?", "My name is Nimbus."),
    ("Who built you?", "Tidewell Labs built me."),
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Name a colour.", "Blue is a colour."),
    ("Where are you from?", "I come from Ravensholt."),
    ("Say hello.", "Hello there!"),
    ("What do you like?", "I like cataloguing cloud shapes."),
    ("Capital of France?", "The capital of France is Paris."),
]


def chat_records(n: int = 32) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (CHATS[i % len(CHATS)] for i in range(n))
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [q + " " + a for q, a in CHATS] * 4 + [
        "system user assistant You are a helpful assistant. The quick brown fox jumps over the lazy dog.",
        "Instruction input output prompt completion conversation human gpt answer question text 0123456789",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer random Llama saved with safetensors, plus the local tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,  # larger logits than the 0.02 default, so that LoRA alone can move the loss
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def recipe_dict(model_dir: Path, data_path: Path, output_dir: Path, **sections) -> dict:
    d = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": str(data_path)}], "max_seq_length": 64},
        "training": {
            "max_steps": 20,
            "learning_rate": 5e-3,
            "global_batch_size": 4,
            "logging_steps": 1,
            "warmup": 0,
            "lr_scheduler": "constant",
            "device": "cpu",
        },
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(d.get(section), dict):
            d[section].update(values)
        else:
            d[section] = values
    return d


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir):
    """Write a recipe for the tiny model (and a chat dataset unless given); returns its path."""

    def _make(name: str = "recipe.yaml", data_rows: list[dict] | None = None, **sections) -> Path:
        data = write_jsonl(tmp_path / "train.jsonl", data_rows if data_rows is not None else chat_records())
        d = recipe_dict(tiny_model_dir, data, tmp_path / "run", **sections)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path

    return _make


# ------------------------------------------------------------------ what this session ran (test_zz_every_config_ran)
# Training processes write into plan.json (the accelerate config they were launched with, the distributed type their
# accelerator really set up) into run directories under pytest's basetemp; test_zz_every_config_ran.py, collected
# last, reads them. These hooks tell it whether the whole suite was selected and which tests were skipped.

SESSION = {"deselected": 0, "modules": set(), "skipped": {}}


def pytest_collection_modifyitems(session, config, items):
    SESSION["modules"] = {Path(str(item.fspath)).name for item in items}


def pytest_deselected(items):
    SESSION["deselected"] += len(items)


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SESSION["skipped"][report.nodeid] = reason
