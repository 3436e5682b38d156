"""How long the model takes: the estimate admission control uses to decide whether the queue drains in time.

One graph run costs about ``a + b * padded_tokens + c * texts * length**2``: a fixed cost per run (kernel
launches, thread wake-up, the Python around it), the linear layers, and attention. A single tokens/s figure
cannot stand for that: on a small model a one-text run costs almost as much as an eight-text run, so a rate
measured on lone queries under light load undercounts what a long queue drains at (refusing requests the
server could have answered), and one measured on full batches overcounts what lone long texts cost. The
three coefficients are fitted at warm-up on a few batch shapes; afterwards every run's measured time moves a
scale factor, so the estimate follows what the machine really does now (other processes, thermal limits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PAD_FACTOR = 1.15  # padded tokens per real token in length-sorted batches (rows >= half the longest)
_SCALE_SMOOTHING = 0.1
_SCALE_RANGE = (0.25, 8.0)


class BatchCost:
    def __init__(self) -> None:
        self.coef = np.zeros(3)  # seconds per run, per padded token, per text x length^2
        self.scale = 1.0

    @staticmethod
    def _features(texts: float, length: float) -> np.ndarray:
        return np.array([1.0, texts * length, texts * length * length])

    def fit(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Least squares over (texts, padded length, seconds) samples, coefficients kept >= 0."""
        if not samples:
            raise ValueError("BatchCost.fit needs at least one (texts, length, seconds) sample")
        x = np.stack([self._features(n, length) for n, length, _ in samples])
        y = np.array([s for _, _, s in samples])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        coef = np.clip(coef, 0.0, None)
        if not coef[1] > 0:  # degenerate fit: fall back to the mean time per padded token
            coef = np.array([0.0, float(y.sum() / x[:, 1].sum()), 0.0])
        self.coef = coef
        self.scale = 1.0

    def predict(self, texts: int, length: int) -> float:
        return self.scale * float(self.coef @ self._features(texts, length))

    def observe(self, texts: int, length: int, seconds: float) -> None:
        expected = float(self.coef @ self._features(texts, length))
        if expected <= 0 or seconds <= 0:
            return
        ratio = min(max(seconds / expected, _SCALE_RANGE[0]), _SCALE_RANGE[1])
        self.scale += _SCALE_SMOOTHING * (ratio - self.scale)

    def tokens_within(self, seconds: float, length: int) -> int:
        """Padded tokens a run of rows of ``length`` tokens may hold and still take at most ``seconds``
        (at least one row): what keeps one batch from outlasting the latency it is meant to serve."""
        a, b, c = self.coef
        per_token = self.scale * (b + c * length)
        if per_token <= 0:
            return 1 << 62
        return max(length, int((seconds - self.scale * a) / per_token))

    def drain_seconds(self, texts: int, tokens: int, squared_lengths: int, batch_size: int) -> float:
        """Time to run ``texts`` queued texts holding ``tokens`` tokens (``squared_lengths`` = the sum of
        each text's length squared) in batches of up to ``batch_size``."""
        if texts <= 0:
            return 0.0
        a, b, c = self.coef
        runs = math.ceil(texts / batch_size)
        return self.scale * (a * runs + PAD_FACTOR * (b * tokens + c * squared_lengths))
