"""Labelled sentence pairs for the export's quality gate (``--validate-with PATH``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError

# A variant keeps at least this share of the reference's Spearman correlation, or it is refused.
QUALITY_GATES = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.995}


@dataclass(frozen=True)
class LabelledPairs:
    name: str
    first: list[str]
    second: list[str]
    score: np.ndarray

    @property
    def texts(self) -> list[str]:
        return self.first + self.second

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The pairs as a cross-encoder scores them."""
        return list(zip(self.first, self.second))


def load_pairs(path: Path) -> LabelledPairs:
    """A TSV of sentence pairs with a similarity score: either with a header naming ``sentence1``,
    ``sentence2`` and ``score`` columns (the STS-B layout), or headerless ``sentence1<TAB>sentence2<TAB>score``."""
    try:
        lines = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read --validate-with {path}: {exc}") from exc
    header = lines[0].split("\t") if lines else []
    if {"sentence1", "sentence2", "score"} <= set(header):
        cols = (header.index("sentence1"), header.index("sentence2"), header.index("score"))
        rows = [line.split("\t") for line in lines[1:]]
    else:
        cols = (0, 1, 2)
        rows = [line.split("\t") for line in lines]
    try:
        first = [r[cols[0]] for r in rows]
        second = [r[cols[1]] for r in rows]
        score = np.array([float(r[cols[2]]) for r in rows])
    except (IndexError, ValueError) as exc:
        raise ExportError(
            f"--validate-with {path} is not a TSV of sentence1, sentence2, score ({exc}); see README for the layout"
        ) from exc
    if len(score) < 10:
        raise ExportError(f"--validate-with {path} has {len(score)} pairs; a quality gate needs at least 10")
    return LabelledPairs(path.name, first, second, score)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # average the ranks of ties
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def pair_spearman(vectors: np.ndarray, pairs: LabelledPairs) -> float:
    n = len(pairs.first)
    a, b = vectors[:n].astype(np.float64), vectors[n:].astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return spearman(cos, pairs.score)
