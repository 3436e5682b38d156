"""Group texts by token length so a batch carries little padding, and pad each batch to its own longest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # positions in the caller's list
    input_ids: np.ndarray  # int64 [n, longest]
    attention_mask: np.ndarray  # int64 [n, longest]


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Sort by length (longest first) and cut batches that hold at most ``batch_size`` texts and at most
    ``max_batch_tokens`` padded tokens. Longest first makes the first batch the largest, so memory peaks
    early and predictably."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])
        fit = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        batches.append(order[start : start + fit])
        start += fit
    return batches


def make_batches(
    ids: list[list[int]], lengths: np.ndarray, pad_id: int, batch_size: int, max_batch_tokens: int
) -> Iterator[Batch]:
    for idx in plan_batches(lengths, batch_size, max_batch_tokens):
        longest = int(lengths[idx].max())
        input_ids = np.full((len(idx), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), longest), dtype=np.int64)
        for row, i in enumerate(idx):
            n = int(lengths[i])
            input_ids[row, :n] = ids[i]
            mask[row, :n] = 1
        yield Batch(indices=idx, input_ids=input_ids, attention_mask=mask)
