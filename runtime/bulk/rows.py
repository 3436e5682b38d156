"""Embed one batch of raw column values, row by row fault-tolerant: a bad row is reported, never fatal.

Texts are tokenised once; the batches are formed exactly as ``Embedder.embed`` forms them (length-sorted,
under the token budget) and run through ``Embedder.embed_tokens``, so every vector equals ``embed`` of its
text (the INT8 graph is batch-invariant; FP32 agrees to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..batching import make_batches
from ..embedder import Embedder
from ..errors import EmbedderError


@dataclass
class EmbeddedRows:
    """Vectors of the rows that could be embedded, and why the others could not."""

    vectors: np.ndarray  # float32 (n_ok, dim), in row order of ``ok``
    ok: np.ndarray  # bool (n,)
    reasons: list[str | None]  # per row: None if embedded
    tokens: int  # tokens fed to the model (after truncation)
    truncated: int  # rows cut to max_length


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


def embed_rows(
    emb: Embedder, values: list[object], *, query: bool = False, truncate: bool = True, batch_size: int | None = None
) -> EmbeddedRows:
    """Embed every usable value; ``query`` prepends the manifest's query instruction (as ``embed_queries``)."""
    n = len(values)
    reasons: list[str | None] = [None] * n
    prefix = emb.manifest.query_instruction if query else ""
    texts: list[str] = []
    where: list[int] = []
    for i, value in enumerate(values):
        text, reason = as_text(value)
        if reason is not None:
            reasons[i] = reason
        else:
            texts.append(prefix + text)
            where.append(i)
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
        return _one_by_one(emb, values, reasons, prefix, truncate, batch_size)
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
    good = np.ones(len(keep), dtype=bool)
    default_batch, max_tokens, pad_multiple = emb.batch_limits
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    for batch in make_batches(
        ids, lengths, emb.manifest.pad_token_id, batch_size or default_batch, max_tokens,
        pad_multiple=pad_multiple, max_length=emb.max_length,
    ):
        try:
            out[batch.indices] = emb.embed_tokens(batch.input_ids, batch.attention_mask)
        except EmbedderError as exc:  # e.g. a non-finite vector: blame the batch's rows, keep the job
            good[batch.indices] = False
            for k in batch.indices:
                reasons[where[keep[k]]] = f"{type(exc).__name__}: {exc}"
    rows = np.array([where[j] for j in keep], dtype=np.int64)
    ok[rows[good]] = True
    n_cut = sum(1 for k, j in enumerate(keep) if good[k] and j in cut)
    return EmbeddedRows(out[good], ok, reasons, int(lengths[good].sum()), n_cut)


def _one_by_one(
    emb: Embedder, values: list[object], reasons: list[str | None], prefix: str, truncate: bool, batch_size: int | None
) -> EmbeddedRows:
    """Slow path, only after the tokenizer refused a batch: each row alone, its refusal recorded."""
    parts: list[np.ndarray] = []
    ok = np.zeros(len(values), dtype=bool)
    tokens = truncated = 0
    for i, value in enumerate(values):
        if reasons[i] is not None:
            continue
        try:
            one = embed_rows(emb, [value], query=bool(prefix), truncate=truncate, batch_size=batch_size)
        except (ValueError, TypeError) as exc:
            reasons[i] = f"{type(exc).__name__}: {exc}"
            continue
        reasons[i] = one.reasons[0]
        if one.ok[0]:
            ok[i] = True
            parts.append(one.vectors)
            tokens += one.tokens
            truncated += one.truncated
    vectors = np.concatenate(parts) if parts else np.empty((0, emb.dim), np.float32)
    return EmbeddedRows(vectors, ok, reasons, tokens, truncated)
