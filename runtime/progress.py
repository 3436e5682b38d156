"""An optional progress bar for long ``embed`` calls, counting tokens (the unit of work) and texts done.

``tqdm`` is an optional dependency (the ``progress`` extra), imported only when a bar is asked for, so
``import runtime`` stays numpy + onnxruntime + tokenizers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Progress:
    """Advances per batch: the bar counts tokens; the postfix counts texts, a text being done once all of
    its rows (windows, for a chunked long text) are."""

    def __init__(self, total_tokens: int, n_texts: int, owners: np.ndarray) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "show_progress=True needs tqdm, an optional dependency: pip install 'bge-onnx[progress]' "
                "(or pip install tqdm), or call without show_progress"
            ) from exc
        self._bar: Any = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="embedding", smoothing=0.1)
        self._n_texts = n_texts
        self._owners = owners
        self._left = np.bincount(owners, minlength=n_texts)  # rows still to embed, per text
        self._done = 0
        self._bar.set_postfix_str(f"0/{n_texts} texts")

    def update(self, rows: np.ndarray, tokens: int) -> None:
        owners = self._owners[rows]
        np.subtract.at(self._left, owners, 1)
        self._done += int(np.count_nonzero(self._left[np.unique(owners)] == 0))
        self._bar.set_postfix_str(f"{self._done}/{self._n_texts} texts", refresh=False)
        self._bar.update(tokens)

    def close(self) -> None:
        self._bar.close()
