"""Parity of each exported variant with the PyTorch reference, and the gates it must pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.reranker import sigmoid

GATES = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}


@dataclass(frozen=True)
class ParityFigures:
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    n_texts: int


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(den, 1e-30)


def parity(candidate: np.ndarray, reference: np.ndarray) -> ParityFigures:
    if candidate.shape != reference.shape:
        raise ValueError(f"shape {candidate.shape} does not match the reference {reference.shape}")
    cos = cosine_rows(candidate, reference)
    if not np.isfinite(candidate).all():
        cos = np.where(np.isfinite(candidate).all(axis=1), cos, -1.0)
    return ParityFigures(
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float(np.nan_to_num(np.abs(candidate - reference), nan=np.inf).max()),
        n_texts=len(cos),
    )


# -- rerankers ------------------------------------------------------------------------------------------------
# FP32 and FP16 must give the reference's logits (FP16 kept its head and softmax inputs in float32); INT8 is
# gated on what a reranker is for: the order of each query's passages, and the score a threshold reads.
LOGIT_GATES = {"fp32": 1e-3, "fp16": 0.05}  # max |logit - reference|
RANK_GATES = {"min_kendall_tau": 0.85, "mean_top3_overlap": 0.9, "max_sigmoid_error": 0.03}
TOP_K = 3


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score lists (ties counted as in scipy's default)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), k=1)
    da, db = da[iu], db[iu]
    concordant = float((da * db).sum())
    den = np.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return concordant / den if den > 0 else 1.0


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> float:
    k = min(k, len(a))
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def ranking_figures(candidate: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """Per query (one array of passage scores each): Kendall tau and top-3 overlap with the reference's order,
    and over all pairs the largest logit and sigmoid-score differences."""
    taus = [kendall_tau(c, r) for c, r in zip(candidate, reference)]
    overlaps = [top_k_overlap(c, r) for c, r in zip(candidate, reference)]
    cat_c, cat_r = np.concatenate(candidate), np.concatenate(reference)
    finite = bool(np.isfinite(cat_c).all())
    return {
        "queries": len(taus),
        "pairs": int(len(cat_c)),
        "min_kendall_tau": float(min(taus)) if finite else -1.0,
        "mean_kendall_tau": float(np.mean(taus)) if finite else -1.0,
        "mean_top3_overlap": float(np.mean(overlaps)) if finite else 0.0,
        "max_abs_logit_diff": float(np.nan_to_num(np.abs(cat_c - cat_r), nan=np.inf).max()),
        "max_sigmoid_error": float(np.nan_to_num(np.abs(sigmoid(cat_c) - sigmoid(cat_r)), nan=1.0).max()),
    }


def ranking_passes(name: str, fig: dict[str, float]) -> bool:
    if name in LOGIT_GATES:
        return fig["max_abs_logit_diff"] <= LOGIT_GATES[name]
    return (fig["min_kendall_tau"] >= RANK_GATES["min_kendall_tau"]
            and fig["mean_top3_overlap"] >= RANK_GATES["mean_top3_overlap"]
            and fig["max_sigmoid_error"] <= RANK_GATES["max_sigmoid_error"])


def ranking_gates(name: str) -> dict[str, float]:
    return {"max_abs_logit_diff": LOGIT_GATES[name]} if name in LOGIT_GATES else dict(RANK_GATES)


# -- bge-m3's sparse and ColBERT outputs ---------------------------------------------------------------------
# Gated on what each output is used for: the lexical matching score between texts and which tokens weigh most,
# the ColBERT late-interaction score between texts, and each ColBERT vector's direction. The scores are taken
# over every pair of probe texts (each text against each, itself included). FP32 must match the reference;
# FP16 and INT8 within what their rounding allows for ranking.
M3_GATES = {
    "fp32": {"min_colbert_cosine": 0.9999, "max_lexical_score_error": 1e-3, "max_colbert_score_error": 1e-4,
             "mean_top10_token_overlap": 0.99},
    "fp16": {"min_colbert_cosine": 0.995, "max_lexical_score_error": 0.02, "max_colbert_score_error": 0.005,
             "mean_top10_token_overlap": 0.9},
    "int8": {"min_colbert_cosine": 0.9, "max_lexical_score_error": 0.1, "max_colbert_score_error": 0.03,
             "mean_top10_token_overlap": 0.8},
}
_M3_MAX = ("max_lexical_score_error", "max_colbert_score_error")


def m3_figures(lexical: list[dict[int, float]], colbert: list[np.ndarray],
               ref_lexical: list[dict[int, float]], ref_colbert: list[np.ndarray]) -> dict[str, float]:
    """Agreement of the sparse and ColBERT outputs with the reference over the probe texts. Lexical score
    error is relative to the largest reference score (a text against itself), so it reads the same at any
    weight scale; ColBERT scores are already on the cosine scale."""
    from runtime.m3 import colbert_score, lexical_score

    n = len(ref_lexical)
    lex = np.array([[lexical_score(lexical[i], lexical[j]) for j in range(n)] for i in range(n)])
    lex_ref = np.array([[lexical_score(ref_lexical[i], ref_lexical[j]) for j in range(n)] for i in range(n)])
    col = np.array([[colbert_score(colbert[i], colbert[j]) for j in range(n)] for i in range(n)])
    col_ref = np.array([[colbert_score(ref_colbert[i], ref_colbert[j]) for j in range(n)] for i in range(n)])
    overlaps = []
    for a, b in zip(lexical, ref_lexical):
        k = min(10, len(b))
        if k:
            top = lambda d: set(sorted(d, key=d.get, reverse=True)[:k])  # noqa: E731
            overlaps.append(len(top(a) & top(b)) / k)
    cosines = [float(cosine_rows(a, b).min()) if a.shape == b.shape and len(a) else (1.0 if a.shape == b.shape else -1.0)
               for a, b in zip(colbert, ref_colbert)]
    scale = max(float(np.abs(lex_ref).max()), 1e-12)
    finite = bool(np.isfinite(lex).all() and np.isfinite(col).all())
    return {
        "texts": n,
        "min_colbert_cosine": min(cosines) if finite else -1.0,
        "max_colbert_score_error": float(np.abs(col - col_ref).max()) if finite else float("inf"),
        "max_lexical_score_error": float(np.abs(lex - lex_ref).max() / scale) if finite else float("inf"),
        "mean_top10_token_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
        "mean_tokens_per_text": float(np.mean([len(d) for d in ref_lexical])),
    }


def m3_failures(name: str, fig: dict[str, float]) -> list[str]:
    """The bge-m3 figures of ``fig`` that miss their gate, as ``"name value vs gate"`` (empty: all pass)."""
    out = []
    for k, v in M3_GATES[name].items():
        if not (fig[k] <= v if k in _M3_MAX else fig[k] >= v):
            out.append(f"{k} {fig[k]:.4g} ({'<=' if k in _M3_MAX else '>='} {v})")
    return out
