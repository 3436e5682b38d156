"""The Embedder: text in, pooled and L2-normalised float32 vectors out, exactly as the manifest says."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .batching import make_batches
from .chunking import DEFAULT_OVERLAP, LONG_TEXT_MODES, Chunks, check_overlap, plan_windows, pool_windows
from .errors import InputTooLongError, InvalidOutputError
from .progress import Progress
from .session import _AUTO_ORDER, ModelSession, check_texts

__all__ = ["Embedder", "RowPlan", "TruncationWarning", "_AUTO_ORDER"]
_NORM_TOLERANCE = 1e-3


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's max length and were cut; ``count`` and ``indices`` say which."""

    def __init__(self, count: int, indices: list[int], max_length: int) -> None:
        self.count = count
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if count > 10 else "")
        super().__init__(
            f"{count} input(s) exceeded {max_length} tokens and were truncated (indices {shown}); "
            "pass long_text='chunk' to embed all of each text as overlapping windows, or long_text='error' "
            "to refuse them"
        )


@dataclass(frozen=True)
class RowPlan:
    """What one ``embed`` call runs: token rows, the text each came from, each text's first row (text i
    owns rows ``first_row[i]:first_row[i + 1]``), and each row's character span and token count."""

    rows: list[list[int]]
    owners: np.ndarray
    first_row: np.ndarray
    spans: list[tuple[int, int]]
    token_counts: list[int]


class Embedder(ModelSession):
    """Loads an artifact directory written by ``python -m export`` and embeds text with onnxruntime.

    One instance may be shared by threads: the tokenizer is never mutated after construction and
    ``InferenceSession.run`` is thread-safe. On CPU, at most ``workers`` graph runs are in flight at once
    (default 1: each run uses every intra-op thread), so many callers get the machine's throughput instead
    of fighting over the cores. ``workers=K`` runs K batches at once on one session (the weights are loaded
    once), each with ``threads`` intra-op threads (default: the cores divided by K): on small batches that
    gets more of a multi-core CPU than one run on every core (``benchmarks/layout.py``), and ``embed`` then
    runs its batches K at a time.
    """

    # -- embedding -------------------------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        truncate: bool | None = None,
        *,
        long_text: str | None = None,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed ``texts``; float32 ``(len(texts), dim)`` in input order. ``batch_size`` defaults to 32 on
        CPU and 128 on CUDA; the token budget (``max_batch_tokens``) caps every batch either way.

        A text longer than ``max_length`` tokens, by ``long_text``: ``"truncate"`` (default; keeps its first
        tokens, with a ``TruncationWarning``), ``"error"`` (``InputTooLongError``) or ``"chunk"`` (windows of
        ``max_length`` tokens sharing ``overlap`` tokens (None: 64, at most half a window), embedded in the
        same batches as the other texts, pooled as their token-weighted mean, normalised as the model's
        vectors are). ``truncate=True`` is ``long_text="truncate"`` and ``truncate=False`` is
        ``long_text="error"`` (the older spelling, kept). Texts that fit are embedded exactly as without
        chunking. ``show_progress`` draws a tqdm bar (tokens and texts; needs the ``progress`` extra).
        """
        mode = _resolve_long_text(truncate, long_text)
        batch_size = self._check_call(texts, batch_size)
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        plan = self.plan_rows(texts, mode, overlap)
        vectors = self._embed_rows(plan.rows, plan.owners, len(texts), batch_size, show_progress)
        if len(plan.rows) == len(texts):  # nothing was chunked: one row per text, in input order
            return vectors
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(len(texts)):
            a, b = int(plan.first_row[i]), int(plan.first_row[i + 1])
            if b - a == 1:
                out[i] = vectors[a]
            else:
                out[i] = pool_windows(vectors[a:b], plan.token_counts[a:b], self._manifest.normalize)
                self._check_output(out[i : i + 1], np.array([i]))
        return out

    def embed_chunks(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        *,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> list[Chunks]:
        """Per text, its window vectors, character spans and token counts (a ``Chunks``), for indexes that
        store chunks rather than documents. A text that fits is one window spanning all of it (its vector is
        ``embed``'s); a longer one is cut as ``embed(..., long_text="chunk")`` cuts it, and each window's
        vector is the vector of ``text[a:b]`` for its span ``(a, b)``."""
        batch_size = self._check_call(texts, batch_size)
        if not texts:
            return []
        plan = self.plan_rows(texts, "chunk", overlap)
        vectors = self._embed_rows(plan.rows, plan.owners, len(texts), batch_size, show_progress)
        result = []
        for i in range(len(texts)):
            a, b = int(plan.first_row[i]), int(plan.first_row[i + 1])
            result.append(Chunks(vectors[a:b], tuple(plan.spans[a:b]), tuple(plan.token_counts[a:b])))
        return result

    def _check_call(self, texts: Sequence[str], batch_size: int | None) -> int:
        check_texts(texts)
        if batch_size is None:
            batch_size = self._default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size

    def plan_rows(self, texts: Sequence[str], mode: str, overlap: int | None = None) -> RowPlan:
        """The token rows to embed: one per text that fits (or is truncated), and for ``mode="chunk"`` one
        per window of each text that does not fit, with the text each row belongs to. Public for callers
        that batch rows themselves (the server); ``embed`` is this plus batching and pooling."""
        budget = self.max_length - len(self._tokenizer.prefix) - len(self._tokenizer.suffix)
        if overlap is None:  # 64 tokens, or half a window for models with short windows
            overlap = min(DEFAULT_OVERLAP, budget // 2)
        if mode == "chunk":
            check_overlap(overlap, budget)
        encoded = self.tokenize(texts)
        long = encoded.truncated
        spans = [(0, len(t)) for t in texts]
        counts = [len(r) for r in encoded.ids]
        if long and mode == "error":
            i = long[0]
            if len(texts[i]) > self._tokenizer.max_chars:  # counting all of a huge text takes seconds
                raise InputTooLongError(i, self.max_length + 1, self.max_length, at_least=True)
            raise InputTooLongError(i, self.count_tokens(texts[i]), self.max_length)
        if long and mode == "truncate":
            warnings.warn(TruncationWarning(len(long), long, self.max_length), stacklevel=3)
        if mode != "chunk" or not long:
            n = len(texts)
            return RowPlan(encoded.ids, np.arange(n), np.arange(n + 1), spans, counts)
        content = dict(zip(long, self._tokenizer.encode_content([texts[i] for i in long])))
        prefix, suffix = self._tokenizer.prefix, self._tokenizer.suffix
        rows: list[list[int]] = []
        owners: list[int] = []
        first_row = [0]
        row_spans: list[tuple[int, int]] = []
        for i in range(len(texts)):
            enc = content.get(i)
            if enc is None:
                rows.append(encoded.ids[i])
                owners.append(i)
                row_spans.append(spans[i])
            else:
                for w in plan_windows(enc.word_ids, enc.offsets, budget, overlap):
                    rows.append(prefix + enc.ids[w.start : w.end] + suffix)
                    owners.append(i)
                    row_spans.append((w.char_start, w.char_end))
            first_row.append(len(rows))
        return RowPlan(rows, np.array(owners), np.array(first_row), row_spans, [len(r) for r in rows])

    def _embed_rows(
        self, rows: list[list[int]], owners: np.ndarray, n_texts: int, batch_size: int, show_progress: bool
    ) -> np.ndarray:
        """Embed token rows (special tokens included, at most ``max_length``) in length-sorted batches;
        float32 ``(len(rows), dim)`` in row order. Errors name the text (``owners``) a bad row came from."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        progress = Progress(int(lengths.sum()), n_texts, owners) if show_progress else None
        batches = make_batches(
            rows, lengths, self._manifest.pad_token_id, batch_size, self._max_batch_tokens,
            pad_multiple=self._pad_multiple, max_length=self.max_length,
        )
        try:
            for batch, vectors in self._run_batches(batches):
                self._check_output(vectors, owners[batch.indices])
                out[batch.indices] = vectors
                if progress is not None:
                    progress.update(batch.indices, int(lengths[batch.indices].sum()))
        finally:
            if progress is not None:
                progress.close()
        return out

    def embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embed one pre-tokenised, padded batch (int64 ``[n, length]`` ids and 0/1 mask), as one run.

        For callers that tokenise themselves (or benchmark the graph alone); no batching, sorting or
        truncation happens here, so the caller owns ``length <= max_length`` and the padding."""
        return self.run_tokens(input_ids, attention_mask)

    def embed_queries(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        truncate: bool | None = None,
        *,
        long_text: str | None = None,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed search queries: the manifest's query instruction is prepended to each text; the other
        arguments are ``embed``'s."""
        check_texts(texts)
        prefix = self._manifest.query_instruction
        return self.embed(
            [prefix + t for t in texts], batch_size=batch_size, truncate=truncate, long_text=long_text,
            overlap=overlap, show_progress=show_progress,
        )

    def _check_output(self, vectors: np.ndarray, indices: np.ndarray) -> None:
        super()._check_output(vectors, indices)
        if self._manifest.normalize:
            norms = np.linalg.norm(vectors, axis=1)
            off = np.abs(norms - 1.0) > _NORM_TOLERANCE
            if off.any():
                bad = int(np.flatnonzero(off)[0])
                raise InvalidOutputError(int(indices[bad]), f"norm {norms[bad]:.6f}, expected 1", self._precision)

    def __repr__(self) -> str:
        return (
            f"Embedder({str(self._root)!r}, device={self._device!r}, precision={self._precision!r}, "
            f"dim={self.dim}, providers={self.providers})"
        )


def _resolve_long_text(truncate: bool | None, long_text: str | None) -> str:
    """One mode from the two spellings: ``truncate=True`` is ``"truncate"``, ``truncate=False`` is
    ``"error"``; both given must agree."""
    if long_text is None:
        return "error" if truncate is False else "truncate"
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    if truncate is not None and (long_text == "truncate") != bool(truncate):
        raise ValueError(
            f"truncate={truncate} contradicts long_text={long_text!r}; pass long_text alone "
            "(truncate=True is long_text='truncate', truncate=False is long_text='error')"
        )
    return long_text
