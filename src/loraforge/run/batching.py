"""Batches without padding: the samples of a micro-batch packed into rows of at most max_seq_length tokens.

The textbook recipe pads every sample to max_length; trl's default pads a batch to its longest sample;
trl's padding-free mode flattens the batch into one long row, whose attention costs grow with the
square of the row on SDPA/eager. Here the micro-batch's samples are placed into rows of at most
`max_length` tokens (first-fit decreasing), each sample keeping its own positions (position_ids restart
at 0). transformers reads the restarting position_ids (there is no attention_mask) and gives SDPA and
eager attention a block-diagonal causal mask per row; with flash-attention the rows are flattened into
one, which its varlen kernels handle in linear cost.

Labels come pre-shifted (`shift_labels[t]` is the label of token t+1 of the same sample, -100 at each
sample's last token and on padding), so no token is trained to predict the next sample.
`row_lengths` counts each row's non-padding tokens, which the trainer reports as throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows whose sums are <= `capacity` (an item
    longer than `capacity` gets a row of its own). Deterministic: ties keep the original order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def _shift(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


@dataclass
class RowCollator:
    """Collate examples (`input_ids`, `labels`, and `seq_lengths` for pre-packed rows) into padding-free rows."""

    pad_token_id: int
    max_length: int
    flatten: bool = False  # one row for the whole batch (flash-attention's varlen kernels)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        units = []  # (input_ids, shift_labels, position_ids) of each example
        for ex in examples:
            ids = list(ex["input_ids"])
            labels = list(ex.get("labels", ids))
            segs = list(ex.get("seq_lengths") or [len(ids)])
            pos, shifted, at = [], [], 0
            for n in segs:
                pos.extend(range(n))
                shifted.extend(_shift(labels[at: at + n]))
                at += n
            units.append((ids, shifted, pos))
        if self.flatten:
            groups = [list(range(len(units)))]
        else:
            groups = pack_rows([len(u[0]) for u in units], self.max_length)
        rows = []
        for g in groups:
            ids = [t for i in g for t in units[i][0]]
            shifted = [t for i in g for t in units[i][1]]
            pos = [t for i in g for t in units[i][2]]
            rows.append((ids, shifted, pos))
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        shift_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        # padding continues as a sequence of its own (positions from 0), so it never attends into a sample
        position_ids = torch.arange(width).repeat(len(rows), 1)
        lengths = []
        for r, (ids, shifted, pos) in enumerate(rows):
            n = len(ids)
            lengths.append(n)
            input_ids[r, :n] = torch.tensor(ids)
            shift_labels[r, :n] = torch.tensor(shifted)
            position_ids[r, :n] = torch.tensor(pos)
            position_ids[r, n:] = torch.arange(width - n)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "shift_labels": shift_labels,
            "labels": shift_labels,  # what the Trainer looks for to count the loss tokens of a step (it uses shift_labels)
            "row_lengths": torch.tensor(lengths),
        }


def split_rows(batch: dict[str, Any], rows_per_forward: int) -> list[dict[str, Any]]:
    """The batch in chunks of `rows_per_forward` rows, each cut to its longest row (no padding for one row)."""
    n = batch["input_ids"].size(0)
    if n <= rows_per_forward:
        return [batch]
    out = []
    for start in range(0, n, rows_per_forward):
        sl = slice(start, start + rows_per_forward)
        lengths = batch["row_lengths"][sl]
        width = int(lengths.max())
        chunk = {k: batch[k][sl, :width] for k in ("input_ids", "position_ids", "shift_labels")}
        chunk["labels"] = chunk["shift_labels"]
        chunk["row_lengths"] = lengths
        out.append(chunk)
    return out
