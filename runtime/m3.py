"""bge-m3's three outputs (dense, sparse lexical weights, ColBERT vectors) from one graph run, and the scores
FlagEmbedding's BGEM3FlagModel computes from them.

``Embedder.encode`` runs the graph once per batch and asks onnxruntime only for the outputs the caller wants;
this module turns the per-token outputs of a batch into each text's lexical weights and ColBERT matrix, and
scores them. numpy only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["M3Output", "colbert_score", "hybrid_scores", "lexical_score", "lexical_weights"]


@dataclass(frozen=True)
class M3Output:
    """What ``Embedder.encode`` returns, in input order; an output not asked for is None.

    ``dense``: float32 ``(n, dim)``. ``sparse``: per text, ``{token id: weight}`` (the max weight of each id
    over the text's tokens; special tokens and weights <= 0 dropped; ``Embedder.lexical_tokens`` names the
    ids). ``colbert``: per text, float32 ``(tokens - 1, colbert_dim)``, one normalised row per token after
    the first."""

    dense: np.ndarray | None
    sparse: list[dict[int, float]] | None
    colbert: list[np.ndarray] | None


def lexical_weights(token_ids: np.ndarray, weights: np.ndarray, skip: np.ndarray) -> dict[int, float]:
    """One text's lexical weights from its real tokens' ids and per-token weights: the max per id, without
    the ``skip`` ids and weights <= 0 (FlagEmbedding's ``_process_token_weights``)."""
    keep = (weights > 0) & ~np.isin(token_ids, skip)
    ids, w = token_ids[keep], weights[keep].astype(np.float64)
    if not len(ids):
        return {}
    uniq, inverse = np.unique(ids, return_inverse=True)
    best = np.zeros(len(uniq))
    np.maximum.at(best, inverse, w)
    return dict(zip(uniq.tolist(), best.tolist()))


def lexical_score(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Sum over the ids both texts hold of the product of their weights (BGEM3FlagModel's
    ``compute_lexical_matching_score``)."""
    if len(a) > len(b):
        a, b = b, a
    return float(sum(w * b[t] for t, w in a.items() if t in b))


def colbert_score(query: np.ndarray, passage: np.ndarray) -> float:
    """Late interaction: each query vector's best dot product over the passage's vectors, averaged over the
    query's vectors (BGEM3FlagModel's ``colbert_score``). 0 for an empty query."""
    q, p = np.asarray(query, dtype=np.float32), np.asarray(passage, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or (len(q) and len(p) and q.shape[1] != p.shape[1]):
        raise ValueError(f"ColBERT matrices must be 2-D with the same width, got {q.shape} and {p.shape}")
    if not len(q) or not len(p):
        return 0.0
    return float((q @ p.T).max(axis=1).sum() / len(q))


def hybrid_scores(query: M3Output, passages: M3Output, weights: Sequence[float] = (1.0, 1.0, 1.0),
                  query_index: int = 0) -> dict[str, np.ndarray]:
    """Scores of one query (row ``query_index`` of ``query``) against every passage, by each output and their
    weighted means, keyed as BGEM3FlagModel's ``compute_score``: "dense", "sparse", "colbert",
    "sparse+dense" and "colbert+sparse+dense" (``weights`` = (dense, sparse, colbert))."""
    if len(weights) != 3:
        raise ValueError(f"weights must be (dense, sparse, colbert), got {weights!r}")
    for name, out in (("query", query), ("passages", passages)):
        if out.dense is None or out.sparse is None or out.colbert is None:
            raise ValueError(f"{name} must hold all three outputs: encode(..., dense=True, sparse=True, colbert=True)")
    wd, ws, wc = (float(w) for w in weights)
    dense = passages.dense @ query.dense[query_index]  # type: ignore[index,operator]
    sparse = np.array([lexical_score(query.sparse[query_index], p) for p in passages.sparse])  # type: ignore[index,union-attr]
    colbert = np.array([colbert_score(query.colbert[query_index], p) for p in passages.colbert])  # type: ignore[index,union-attr]
    return {
        "dense": dense.astype(np.float64),
        "sparse": sparse,
        "colbert": colbert,
        "sparse+dense": (ws * sparse + wd * dense) / (ws + wd),
        "colbert+sparse+dense": (wc * colbert + ws * sparse + wd * dense) / (wc + ws + wd),
    }
