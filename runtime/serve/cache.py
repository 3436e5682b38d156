"""Exact-match vector cache: repeated texts are answered without running the model.

Keys carry the artifact digest and the input type, so two models (or a re-exported artifact) never share
an entry. The vectors are batch-invariant (static INT8 scales, FP32 within 1e-6), so a cached vector is
the one a fresh run would return."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class VectorCache:
    """Thread-safe LRU of ``key -> float32 vector``; ``capacity`` 0 turns it off (every lookup misses)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        if not self.capacity:
            return None
        with self._lock:
            vec = self._data.get(key)
            if vec is not None:
                self._data.move_to_end(key)
            return vec

    def put(self, key: Hashable, vector: np.ndarray) -> None:
        if not self.capacity:
            return
        vec = np.array(vector, dtype=np.float32, copy=True)  # never alias a batch's output buffer
        vec.flags.writeable = False
        with self._lock:
            self._data[key] = vec
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
