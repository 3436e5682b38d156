"""Long texts as overlapping windows: where to cut (in token space, on word boundaries) and how to pool.

A text longer than the model's ``max_length`` is cut into windows of at most ``budget`` content tokens
(``max_length`` minus the special tokens each window is re-wrapped with), consecutive windows sharing about
``overlap`` tokens. Cuts fall on pre-tokenizer word boundaries, so that the character span of a window,
tokenised again on its own, gives back exactly the window's ids: a chunk's vector is then the vector of its
text, which is what a chunk index stores and shows. Only a single word longer than a whole window is cut
mid-word (its span then re-tokenises differently; ``Window.exact`` says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LONG_TEXT_MODES = ("truncate", "error", "chunk")
DEFAULT_OVERLAP = 64


@dataclass(frozen=True)
class Window:
    """Content tokens ``[start, end)`` of one text, and their character span ``[char_start, char_end)``."""

    start: int
    end: int
    char_start: int
    char_end: int
    exact: bool = True  # False only when a single word longer than the window had to be cut mid-word


@dataclass(frozen=True)
class Chunks:
    """The windows of one text as ``Embedder.embed_chunks`` returns them: one row of ``vectors`` per window,
    its character span in the original text (``text[a:b]`` embeds to that row) and its token count
    (special tokens included). A text that fits is one window spanning the whole text."""

    vectors: np.ndarray  # float32 [n_windows, dim]
    spans: tuple[tuple[int, int], ...]
    token_counts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.spans)


def check_overlap(overlap: int, budget: int) -> None:
    """Refuse an overlap that would leave windows no room to advance."""
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    if overlap >= budget:
        raise ValueError(
            f"overlap ({overlap}) must be smaller than a window's {budget} content tokens "
            f"(max_length minus special tokens); pass a smaller overlap, e.g. overlap={budget // 4}"
        )


def plan_windows(
    word_ids: Sequence[int | None],
    offsets: Sequence[tuple[int, int]],
    budget: int,
    overlap: int,
) -> list[Window]:
    """Windows over ``len(word_ids)`` content tokens: each at most ``budget`` tokens, ending on a word
    boundary, and each after the first starting on the first word boundary at or after ``overlap`` tokens
    before the previous one's end (so the overlap is at most ``overlap`` tokens, never a split word)."""
    check_overlap(overlap, budget)
    n = len(word_ids)
    if n == 0:
        return []
    # boundary[i]: a window may start at token i (and the one before may end there)
    starts = np.ones(n + 1, dtype=bool)
    for i in range(1, n):
        starts[i] = word_ids[i] is None or word_ids[i] != word_ids[i - 1]
    boundaries = np.flatnonzero(starts)  # sorted, includes 0 and n
    windows: list[Window] = []
    s = 0
    while True:
        if n - s <= budget:
            e = n
        else:
            k = int(np.searchsorted(boundaries, s + budget, side="right")) - 1
            e = int(boundaries[k])
            if e <= s:  # one word longer than a whole window: cut it mid-word
                e = s + budget
        exact = bool(starts[s] and starts[e])
        windows.append(Window(s, e, int(offsets[s][0]), int(offsets[e - 1][1]), exact))
        if e >= n:
            return windows
        k = int(np.searchsorted(boundaries, max(e - overlap, s + 1), side="left"))
        s = int(boundaries[k]) if k < len(boundaries) and boundaries[k] <= e else e


def pool_windows(
    vectors: np.ndarray,
    token_counts: Sequence[int],
    normalize: bool,
    lead_decay: float | None = None,
) -> np.ndarray:
    """One float32 vector from a text's window vectors: their mean weighted by each window's token count
    (a short tail window counts less), times ``lead_decay ** index`` when given (the text's lead counts
    more: news and most documents say what they are about first), then L2-normalised when the model's
    vectors are."""
    w = np.asarray(token_counts, dtype=np.float64)
    if lead_decay is not None:
        if not 0 < lead_decay <= 1:
            raise ValueError(f"lead_decay must be in (0, 1], got {lead_decay}")
        w = w * lead_decay ** np.arange(len(w))
    pooled = (w[:, None] * vectors.astype(np.float64)).sum(axis=0) / w.sum()
    if normalize:
        norm = np.linalg.norm(pooled)
        if norm > 0:  # a zero mean is left as is: the caller's output check names the input
            pooled = pooled / norm
    return pooled.astype(np.float32)
