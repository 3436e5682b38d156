"""Tokenisation: tiny requests on the event loop, the rest off it in two lanes, so that a huge request
cannot hold up a one-line one.

A request with at most ``INLINE_CHARS`` characters (a query, a sentence) is tokenised on the event loop
itself: that takes 0.04-0.2 ms, less than the hop to a thread and back costs (measured: 0.26 ms of CPU a
request across the threads, a quarter of a small model's whole request). Other small requests (a few
passages) go to a pool of threads (``--tokenizer-workers``).
A request with more than ``LARGE_CHARS`` characters to tokenise (after the runtime's cut of long texts in
truncate mode; all of each text for ``long_text`` chunk or error) goes to a lane of its own, one thread, so
two such requests never occupy every small-lane thread. The Rust tokenizer releases the GIL in
``encode_batch``, so the large lane takes a core from the others only as the OS shares it.

The large lane is admitted like the model's queue: a request is refused (``QueueFull``, 429) when the
characters queued in the lane ahead of it and its own would not be tokenised within the queue-time budget at
the rate the lane has measured; a request always gets in when the lane is idle.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .errors import QueueFull

T = TypeVar("T")

INLINE_CHARS = 256  # tokenised on the event loop: at most ~0.2 ms of it
LARGE_CHARS = 65536  # about 20-80 ms of tokenising on one core (English / Chinese text)
_INITIAL_RATE = 200_000.0  # characters per second before the lane has measured one: Chinese text's, the slowest


class Tokenization:
    """The two lanes, and what the large one has queued. Admission state is touched on the event loop only."""

    def __init__(self, workers: int, budget_s: float) -> None:
        self._small = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="tokenize-large")
        self._budget_s = budget_s
        self._queued_chars = 0
        self.rate = _INITIAL_RATE  # characters per second in the large lane (moving average)

    @property
    def queued_chars(self) -> int:
        return self._queued_chars

    async def run(self, chars: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the lane that ``chars`` (characters it will tokenise) picks."""
        loop = asyncio.get_running_loop()
        if chars <= INLINE_CHARS:
            return fn(*args)
        if chars <= LARGE_CHARS:
            return await loop.run_in_executor(self._small, fn, *args)
        wait = (self._queued_chars + chars) / self.rate
        if self._queued_chars and wait > self._budget_s:
            ahead = self._queued_chars / self.rate
            raise QueueFull(max(1, math.ceil(ahead)), f"{self._queued_chars} characters are queued for tokenising "
                            f"ahead of this request's {chars} (about {wait:.1f} s at {self.rate:,.0f} characters/s), "
                            f"over the budget of {self._budget_s:g} s (--max-queue-time)")
        self._queued_chars += chars
        try:
            result = await loop.run_in_executor(self._large, _timed, fn, args)
        finally:
            self._queued_chars -= chars
        value, busy = result
        if busy > 0.01:
            self.rate = 0.7 * self.rate + 0.3 * (chars / busy)
        return value

    def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)


def _timed(fn: Callable[..., T], args: tuple) -> tuple[T, float]:
    """Run ``fn`` and say how long it took itself (not counting its wait in the lane's queue)."""
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0
