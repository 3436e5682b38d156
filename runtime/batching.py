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


MIN_FILL = 0.5  # a text joins a batch only if it is at least this fraction of the batch's longest
# Graphs with flash attention for unpadded batches (long-context models, export/long_attention.py): a batch whose
# longest row passes this many tokens holds only rows of exactly that length, so it never takes the padded path,
# whose fused kernel keeps heads x length x length scores per text (4 GiB a layer at 8,192 tokens in FP32, so
# two padded 8,000-token texts in one 16,384-token budget ran out of memory). A text that long fills the
# matrix units on its own: running it alone costs nothing measurable (texts/s at 2,048 tokens: 1 x 2 unpadded
# 0.43, see docs/m3.md).
UNPADDED_PAST = 512


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int,
                 unpadded_past: int | None = None) -> list[np.ndarray]:
    """Sort by length (longest first) and cut batches that hold at most ``batch_size`` texts, at most
    ``max_batch_tokens`` padded tokens, and no text shorter than half the batch's longest (so padding is
    under half of any row: one 512-token document no longer drags seven short sentences to 512).
    Longest first makes the first batch the largest, so memory peaks early and predictably. With
    ``unpadded_past``, a batch whose longest row passes it takes only rows of that same length (no padding)."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        fit = max(1, min(batch_size, max_batch_tokens // longest))
        floor = longest if unpadded_past is not None and longest > unpadded_past else MIN_FILL * longest
        end = start + 1
        while end < min(n, start + fit) and lengths[order[end]] >= floor:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def make_batches(
    ids: list[list[int]],
    lengths: np.ndarray,
    pad_id: int,
    batch_size: int,
    max_batch_tokens: int,
    pad_multiple: int = 1,
    max_length: int | None = None,
    unpadded_past: int | None = None,
) -> Iterator[Batch]:
    """Padded int64 batches in the order of ``plan_batches``. ``pad_multiple`` rounds each batch's length
    up (never past ``max_length``): GPUs run tile-aligned shapes faster and see fewer distinct shapes."""
    for idx in plan_batches(lengths, batch_size, max_batch_tokens, unpadded_past):
        input_ids, mask = pad_batch([ids[i] for i in idx], pad_id, pad_multiple, max_length)
        yield Batch(indices=idx, input_ids=input_ids, attention_mask=mask)


def pad_batch(
    rows: list[list[int]], pad_id: int, pad_multiple: int = 1, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and 0/1 mask for ``rows``, padded to the longest row (rounded up to ``pad_multiple``,
    never past ``max_length``). The server pads its cross-request batches with this too, so a text is fed
    to the graph exactly as ``Embedder.embed`` feeds it."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    longest = max((len(r) for r in rows), default=0)
    if pad_multiple > 1:
        rounded = -(-longest // pad_multiple) * pad_multiple
        longest = max(longest, min(rounded, max_length if max_length is not None else rounded))
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for r, row in enumerate(rows):
        n = len(row)
        input_ids[r, :n] = row
        mask[r, :n] = 1
    return input_ids, mask
