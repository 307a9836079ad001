"""Padding-free rows, the plain LM head and the tokenized-data cache: the same numbers as the obvious way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.run.batching import RowCollator, pack_rows, split_rows


@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(64, 200))
@settings(max_examples=200, deadline=None)
def test_pack_rows_places_every_sample_once_within_capacity(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    # first fit never leaves two rows that are both at most half full (the later one's items would have fit
    # in the earlier), so the rows are few: at most 2 x tokens / capacity + 1
    assert sum(1 for r in rows if sum(lengths[i] for i in r) <= capacity / 2) <= 1


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 30, 17, 4, 22, 12):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # a prompt without loss, then the answer
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collator_rows_hold_each_sample_with_its_own_positions_and_shifted_labels():
    samples = _samples()
    batch = RowCollator(pad_token_id=0, max_length=40)(samples)
    ids, pos, sl = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
    assert ids.shape[0] == len(pack_rows([len(s["input_ids"]) for s in samples], 40)) < len(samples)
    assert int(batch["row_lengths"].sum()) == sum(len(s["input_ids"]) for s in samples)  # real tokens, no padding
    # every sample appears once as a run of positions 0..n-1, with labels shifted inside it
    found = 0
    for r in range(ids.shape[0]):
        n = int(batch["row_lengths"][r])
        starts = [i for i in range(n) if pos[r, i] == 0] + [n]
        for a, b in zip(starts, starts[1:]):
            seg = ids[r, a:b].tolist()
            s = next(x for x in samples if x["input_ids"] == seg)
            assert sl[r, a:b].tolist() == s["labels"][1:] + [-100]
            found += 1
        assert (sl[r, n:] == -100).all()
    assert found == len(samples)


def test_split_rows_cuts_each_chunk_to_its_real_length():
    batch = RowCollator(pad_token_id=0, max_length=40)(_samples())
    chunks = split_rows(batch, 1)
    assert len(chunks) == batch["input_ids"].shape[0]
    for c in chunks:
        assert c["input_ids"].shape[1] == int(c["row_lengths"][0])  # one row: no padding at all
    assert split_rows(batch, 99) == [batch]


def _reference_and_rows(tiny_model_dir, impl):
    """Per-sample HF loss (the obvious way) vs the packed rows through the plain head: summed NLL and
    LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.model.lmhead import add_plain_lm_head

    def fresh():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl)
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        return m.train()

    samples = _samples()
    ref = fresh()
    total = 0.0
    for s in samples:
        out = ref(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]]), use_cache=False)
        n = sum(1 for x in s["labels"][1:] if x != -100)
        (out.loss * n).backward()
        total += out.loss.item() * n
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters() if p.requires_grad}

    ours = fresh()
    add_plain_lm_head(ours.get_base_model())
    batch = RowCollator(pad_token_id=0, max_length=40)(samples)
    nll = 0.0
    for chunk in split_rows(batch, 1):
        out = ours(input_ids=chunk["input_ids"], position_ids=chunk["position_ids"],
                   shift_labels=chunk["shift_labels"], lf_plain_head=True)
        out["nll_sum"].backward()
        nll += out["nll_sum"].item()
    grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    return total, ref_grads, nll, grads


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_with_the_plain_head_equal_one_sample_at_a_time(tiny_model_dir, impl):
    total, ref_grads, nll, grads = _reference_and_rows(tiny_model_dir, impl)
    assert nll == pytest.approx(total, rel=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, atol=1e-4, rtol=1e-3)  # summation order differs


def test_plain_head_equals_trls_fused_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from loraforge.model.lmhead import add_plain_lm_head

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(m, outputs=("log_probs", "is_top1"))
    add_plain_lm_head(m)
    batch = RowCollator(pad_token_id=0, max_length=40)(_samples())
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    plain = m(**inputs, shift_labels=batch["shift_labels"], lf_plain_head=True)
    fused = m(**inputs, shift_labels=batch["shift_labels"], fused_lm_head=True)
    assert plain["nll_sum"].item() == pytest.approx(-fused.log_probs.sum().item(), rel=1e-5)
    assert int(plain["n_valid"]) == int(fused.label_mask.sum())
    assert int(plain["n_correct"]) == int(fused.is_top1.sum())
    # and without the flag the forward is the model's own (generation keeps working)
    assert m(input_ids=batch["input_ids"][:1]).logits.shape[-1] == m.config.vocab_size
