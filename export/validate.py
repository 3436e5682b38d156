"""Parity of each exported variant with the PyTorch reference, and the gates it must pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
