"""Embed one batch of raw column values, row by row fault-tolerant: a bad row is reported, never fatal.

Texts are tokenised once; the batches are formed exactly as ``Embedder.embed`` forms them (length-sorted,
under the token budget) and run through ``Embedder.embed_tokens``, so every vector equals ``embed`` of its
text (the INT8 graph is batch-invariant; FP32 agrees to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..chunking import pool_windows
from ..embedder import Embedder
from ..errors import EmbedderError


LONG_TEXT = ("truncate", "error", "chunk", "chunks")


@dataclass
class EmbeddedRows:
    """Vectors of the rows that could be embedded, and why the others could not.

    With ``long_text="chunks"`` a row has one vector per window: ``windows[k]`` is (row, window index,
    span start, span end) of ``vectors[k]``; otherwise one vector per ok row and ``windows`` is None."""

    vectors: np.ndarray  # float32 (n_ok, dim) in row order of ``ok``; chunks: one per window
    ok: np.ndarray  # bool (n,)
    reasons: list[str | None]  # per row: None if embedded
    tokens: int  # tokens fed to the model (after truncation)
    truncated: int  # rows cut to max_length (chunk/chunks: rows cut into more than one window)
    windows: list[tuple[int, int, int, int]] | None = None
    lexical: list[dict[int, float]] | None = None  # bge-m3 (heads=True): per ok row, in the order of ``vectors``
    colbert: list[np.ndarray] | None = None


def as_text(value: object) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if value is None:
        return None, "text is null"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if not isinstance(value, str):
        return None, f"text is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return None, f"text is not valid Unicode ({exc.reason} at position {exc.start})"
    return value, None


def _usable(values: list[object], prefix: str) -> tuple[list[str], list[int], list[str | None]]:
    """The values that are text (with ``prefix``), their row positions, and per row why it is not text."""
    reasons: list[str | None] = [None] * len(values)
    texts: list[str] = []
    where: list[int] = []
    for i, value in enumerate(values):
        text, reason = as_text(value)
        if reason is not None:
            reasons[i] = reason
        else:
            texts.append(prefix + text)
            where.append(i)
    return texts, where, reasons


def embed_rows(
    emb: Embedder, values: list[object], *, query: bool = False, truncate: bool = True, batch_size: int | None = None,
    long_text: str | None = None, heads: bool = False,
) -> EmbeddedRows:
    """Embed every usable value; ``query`` prepends the manifest's query instruction (as ``embed_queries``).
    ``long_text`` ("truncate", "error", "chunk", "chunks"; None: ``truncate`` decides) says what happens to a
    text past max length, as ``Embedder.embed`` does; "chunks" keeps each window's vector and span.
    ``heads``: bge-m3's lexical weights and ColBERT matrices too, from the same runs (``Embedder.encode``'s)."""
    mode = long_text or ("truncate" if truncate else "error")
    if mode not in LONG_TEXT:
        raise ValueError(f"long_text must be one of {LONG_TEXT}, got {mode!r}")
    if heads and mode in ("chunk", "chunks"):
        raise ValueError("sparse and ColBERT outputs take long_text 'truncate' or 'error'")
    if mode in ("chunk", "chunks"):
        return _embed_windows(emb, values, query, batch_size, mode == "chunks")
    truncate = mode == "truncate"
    n = len(values)
    prefix = emb.manifest.query_instruction if query else ""
    texts, where, reasons = _usable(values, prefix)
    ok = np.zeros(n, dtype=bool)
    if not texts:
        return EmbeddedRows(np.empty((0, emb.dim), np.float32), ok, reasons, 0, 0)
    try:
        encoded = emb.tokenize(texts)
    except (ValueError, TypeError) as exc:
        if n == 1:
            reasons[0] = f"{type(exc).__name__}: {exc}"
            return EmbeddedRows(np.empty((0, emb.dim), np.float32), ok, reasons, 0, 0)
        # the tokenizer refused the batch: find the rows it refuses one by one
        return _one_by_one(emb, values, reasons, prefix, truncate, batch_size, heads)
    keep = list(range(len(texts)))
    cut = set(encoded.truncated)
    if cut and not truncate:
        for j in sorted(cut):
            reasons[where[j]] = (
                f"text has {emb.count_tokens(texts[j])} tokens, more than the model's max length of "
                f"{emb.max_length} (--no-truncate); shorten or split it, or run without --no-truncate"
            )
        keep = [j for j in keep if j not in cut]
    ids = [encoded.ids[j] for j in keep]
    out = np.empty((len(keep), emb.dim), np.float32)
    lexical: list[dict[int, float]] = [{} for _ in keep] if heads else []
    colbert: list[np.ndarray] = [np.empty((0, 0), np.float32)] * len(keep) if heads else []
    good = np.ones(len(keep), dtype=bool)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    for batch in emb.batches(ids, lengths, batch_size):
        try:
            if heads:
                m3 = emb.run_tokens_m3(batch.input_ids, batch.attention_mask)
                out[batch.indices] = m3.dense
                for r, k in enumerate(batch.indices):
                    lexical[k], colbert[k] = m3.sparse[r], m3.colbert[r]  # type: ignore[index]
            else:
                out[batch.indices] = emb.embed_tokens(batch.input_ids, batch.attention_mask)
        except EmbedderError as exc:  # e.g. a non-finite vector: blame the batch's rows, keep the job
            good[batch.indices] = False
            for k in batch.indices:
                reasons[where[keep[k]]] = f"{type(exc).__name__}: {exc}"
    rows = np.array([where[j] for j in keep], dtype=np.int64)
    ok[rows[good]] = True
    n_cut = sum(1 for k, j in enumerate(keep) if good[k] and j in cut)
    picked = np.flatnonzero(good)
    return EmbeddedRows(out[good], ok, reasons, int(lengths[good].sum()), n_cut,
                        lexical=[lexical[k] for k in picked] if heads else None,
                        colbert=[colbert[k] for k in picked] if heads else None)


def _embed_windows(emb: Embedder, values: list[object], query: bool, batch_size: int | None,
                   keep_windows: bool) -> EmbeddedRows:
    """Texts past max length cut into windows by ``Embedder.plan_rows`` (as ``embed(long_text="chunk")`` cuts
    them), every window batched with the other texts; pooled per row ("chunk") or kept ("chunks")."""
    n = len(values)
    prefix = emb.manifest.query_instruction if query else ""
    texts, where, reasons = _usable(values, prefix)
    ok = np.zeros(n, dtype=bool)
    if not texts:
        return EmbeddedRows(np.empty((0, emb.dim), np.float32), ok, reasons, 0, 0, [] if keep_windows else None)
    plan = emb.plan_rows(texts, "chunk")
    lengths = np.fromiter((len(r) for r in plan.rows), dtype=np.int64, count=len(plan.rows))
    out = np.empty((len(plan.rows), emb.dim), np.float32)
    good_row = np.ones(len(plan.rows), dtype=bool)
    for batch in emb.batches(plan.rows, lengths, batch_size):
        try:
            out[batch.indices] = emb.embed_tokens(batch.input_ids, batch.attention_mask)
        except EmbedderError as exc:  # blame the texts whose windows were in the batch, keep the job
            good_row[batch.indices] = False
            for k in batch.indices:
                reasons[where[int(plan.owners[k])]] = f"{type(exc).__name__}: {exc}"
    vectors: list[np.ndarray] = []
    windows: list[tuple[int, int, int, int]] = []
    tokens = cut = 0
    for j, row in enumerate(where):
        a, b = int(plan.first_row[j]), int(plan.first_row[j + 1])
        if not good_row[a:b].all():
            continue
        ok[row] = True
        tokens += int(lengths[a:b].sum())
        cut += b - a > 1
        if keep_windows:
            for w in range(a, b):
                start, end = plan.spans[w]
                # spans index the text the model saw; give them in the row's own text (no instruction)
                windows.append((row, w - a, max(0, start - len(prefix)), max(0, end - len(prefix))))
                vectors.append(out[w])
        else:
            vectors.append(out[a] if b - a == 1 else pool_windows(out[a:b], plan.token_counts[a:b],
                                                                  emb.manifest.normalize))
    stacked = np.stack(vectors).astype(np.float32) if vectors else np.empty((0, emb.dim), np.float32)
    return EmbeddedRows(stacked, ok, reasons, tokens, cut, windows if keep_windows else None)


def _one_by_one(
    emb: Embedder, values: list[object], reasons: list[str | None], prefix: str, truncate: bool, batch_size: int | None,
    heads: bool = False,
) -> EmbeddedRows:
    """Slow path, only after the tokenizer refused a batch: each row alone, its refusal recorded."""
    parts: list[np.ndarray] = []
    lexical: list[dict[int, float]] = []
    colbert: list[np.ndarray] = []
    ok = np.zeros(len(values), dtype=bool)
    tokens = truncated = 0
    for i, value in enumerate(values):
        if reasons[i] is not None:
            continue
        try:
            one = embed_rows(emb, [value], query=bool(prefix), truncate=truncate, batch_size=batch_size, heads=heads)
        except (ValueError, TypeError) as exc:
            reasons[i] = f"{type(exc).__name__}: {exc}"
            continue
        reasons[i] = one.reasons[0]
        if one.ok[0]:
            ok[i] = True
            parts.append(one.vectors)
            lexical += one.lexical or []
            colbert += one.colbert or []
            tokens += one.tokens
            truncated += one.truncated
    vectors = np.concatenate(parts) if parts else np.empty((0, emb.dim), np.float32)
    return EmbeddedRows(vectors, ok, reasons, tokens, truncated, lexical=lexical if heads else None,
                        colbert=colbert if heads else None)
