"""The Embedder: text in, pooled and L2-normalised float32 vectors out, exactly as the manifest says."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .chunking import DEFAULT_OVERLAP, LONG_TEXT_MODES, Chunks, check_overlap, plan_windows, pool_windows
from .errors import ArtifactError, InputTooLongError, InvalidOutputError
from .m3 import M3Output, lexical_weights
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
        batches = self.batches(rows, lengths, batch_size)
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

    # -- bge-m3: dense, sparse and ColBERT from one run ------------------------------------------
    @property
    def has_m3_heads(self) -> bool:
        """Whether the graph also gives bge-m3's sparse (lexical) and ColBERT outputs."""
        return self._manifest.m3 is not None

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        long_text: str | None = None,
        show_progress: bool = False,
    ) -> M3Output:
        """bge-m3's outputs of ``texts`` from one graph run per batch (``M3Output``, input order): the dense
        vectors (``embed``'s), the lexical weights and the ColBERT matrices, each only when asked for (the
        others are not fetched). ``max_length`` cuts texts shorter than the manifest's (BGEM3FlagModel's
        ``max_length``); a text past it is cut with a ``TruncationWarning`` or refused (``long_text="error"``).
        Sparse and ColBERT need an artifact exported from a bge-m3 checkpoint (``has_m3_heads``)."""
        heads = self._manifest.m3
        if (sparse or colbert) and heads is None:
            raise ArtifactError(
                f"{self._root} ({self._manifest.source.model}) has no sparse or ColBERT outputs; only artifacts "
                "exported from a bge-m3 checkpoint (with colbert_linear.pt and sparse_linear.pt) have them. "
                "Use embed() for its dense vectors"
            )
        if not (dense or sparse or colbert):
            raise ValueError("ask for at least one output: dense, sparse or colbert")
        mode = _resolve_long_text(None, long_text)
        if mode == "chunk":
            raise ValueError("long_text='chunk' pools dense windows; encode() takes 'truncate' or 'error' "
                             "(use embed(..., long_text='chunk') for chunked dense vectors)")
        batch_size = self._check_call(texts, batch_size)
        limit = self.max_length if max_length is None else int(max_length)
        if not 2 <= limit <= self.max_length:
            raise ValueError(f"max_length must be between 2 and the artifact's {self.max_length}, got {max_length!r}")
        rows = self._rows_within(texts, limit, mode)
        names = ([self._output_name] if dense else []) + ([heads.sparse_output] if sparse and heads else []) \
            + ([heads.colbert_output] if colbert and heads else [])
        n = len(rows)
        vectors = np.empty((n, self.dim), dtype=np.float32) if dense else None
        lexical: list[dict[int, float]] | None = [{} for _ in range(n)] if sparse else None
        matrices: list[np.ndarray] | None = [np.empty((0, 0), np.float32)] * n if colbert else None
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
        progress = Progress(int(lengths.sum()), n, np.arange(n)) if show_progress else None
        batches = self.batches(rows, lengths, batch_size)
        try:
            for batch, outs in self._run_batches(batches, outputs=tuple(names)):
                got = dict(zip(names, outs))
                if vectors is not None:
                    self._check_output(got[self._output_name], batch.indices)
                    vectors[batch.indices] = got[self._output_name]
                sparse_out = got.get(heads.sparse_output) if heads else None  # None when not asked for
                colbert_out = got.get(heads.colbert_output) if heads else None
                lex, cols = self._per_row(batch.input_ids, lengths[batch.indices], sparse_out, colbert_out,
                                          batch.indices)
                for r, i in enumerate(batch.indices):
                    if lexical is not None and lex is not None:
                        lexical[i] = lex[r]
                    if matrices is not None and cols is not None:
                        matrices[i] = cols[r]
                if progress is not None:
                    progress.update(batch.indices, int(lengths[batch.indices].sum()))
        finally:
            if progress is not None:
                progress.close()
        return M3Output(dense=vectors, sparse=lexical, colbert=matrices)

    def run_tokens_m3(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, lone: bool = False) -> M3Output:
        """One pre-tokenised, padded batch (right padding) as one run with all three bge-m3 outputs, per row;
        for callers that batch themselves (the server). ``lone``: as in ``run_tokens``."""
        heads = self._manifest.m3
        if heads is None:
            raise ArtifactError(f"{self._root} has no sparse or ColBERT outputs (not a bge-m3 export)")
        ids, mask = self._checked_batch(input_ids, attention_mask)
        dense, weights, cols = self._run_named(ids, mask, (self._output_name, heads.sparse_output, heads.colbert_output),
                                               lone=lone)
        self._check_output(dense, np.arange(len(ids)))
        lexical, matrices = self._per_row(ids, mask.sum(axis=1), weights, cols, np.arange(len(ids)))
        return M3Output(dense=dense, sparse=lexical, colbert=matrices)

    def _per_row(self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, cols: np.ndarray | None,
                 owners: np.ndarray) -> tuple[list[dict[int, float]] | None, list[np.ndarray] | None]:
        """A padded batch's per-token outputs as each row's lexical weights and ColBERT matrix (its real tokens
        only), checked finite; errors name the input (``owners``) a bad row came from."""
        skip = np.array(self._manifest.m3.skip_token_ids if self._manifest.m3 else (), dtype=np.int64)
        lexical: list[dict[int, float]] | None = [] if weights is not None else None
        matrices: list[np.ndarray] | None = [] if cols is not None else None
        for r, n in enumerate(lengths.tolist()):
            if lexical is not None and weights is not None:
                self._check_finite(weights[r, :n], int(owners[r]))
                lexical.append(lexical_weights(ids[r, :n], weights[r, :n], skip))
            if matrices is not None and cols is not None:
                self._check_finite(cols[r, : n - 1], int(owners[r]))
                matrices.append(cols[r, : max(n - 1, 0)].copy())
        return lexical, matrices

    def _rows_within(self, texts: Sequence[str], limit: int, mode: str) -> list[list[int]]:
        """Token rows of ``texts`` cut to ``limit`` tokens as the tokenizer's own truncation cuts them (the
        content shortened, the closing special tokens kept); warns or raises for texts past it."""
        encoded = self.tokenize(texts)
        suffix = self._tokenizer.suffix
        long = sorted(set(encoded.truncated) | {i for i, r in enumerate(encoded.ids) if len(r) > limit})
        if long and mode == "error":
            i = long[0]
            if len(texts[i]) > self._tokenizer.max_chars:
                raise InputTooLongError(i, limit + 1, limit, at_least=True)
            raise InputTooLongError(i, self.count_tokens(texts[i]), limit)
        if long:
            warnings.warn(TruncationWarning(len(long), long, limit), stacklevel=3)
        return [r if len(r) <= limit else r[: limit - len(suffix)] + suffix for r in encoded.ids]

    def _check_finite(self, values: np.ndarray, index: int) -> None:
        if not np.isfinite(values).all():
            raise InvalidOutputError(index, "NaN or inf in the sparse or ColBERT output", self._precision)

    def lexical_tokens(self, weights: dict[int, float]) -> dict[str, float]:
        """Lexical weights keyed by token text instead of id (BGEM3FlagModel's ``convert_id_to_token``)."""
        return {self._tokenizer.decode_id(t): w for t, w in weights.items()}

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
