"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np


def chinese_text(n_chars: int, rng: np.random.Generator) -> str:
    """``n_chars`` common CJK ideographs: one token each in the BGE zh vocabularies."""
    return "".join(chr(int(c)) for c in rng.integers(0x4E00, 0x4E00 + 6000, size=n_chars))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
