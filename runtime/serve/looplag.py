"""How far behind the event loop is: the delay every request meets before admission can see it.

Admission prices the model's queue, but a request is read by the event loop first. When the loop itself is
the bottleneck (a fast model: a tiny one on CPU, or a GPU, where one Python loop parses requests slower than
the model answers them), requests wait in socket buffers where no queue estimate sees them: with the tiny
model at 1,600 req/s offered on 2 cores (load generator included), 68-494 req/s were answered within a
100 ms SLO, p99 3.5-7.7 s, and not one 429. A timer that should fire every few milliseconds fires late by
about what the loop has queued ahead of it. That lateness, sustained over several ticks, is exported as
``bge_event_loop_lag_seconds`` (the saturation signal an autoscaler needs where the model queue shows none),
and with ``--max-loop-lag`` the server refuses new requests at once while it lasts (no body read, no
tokenising). The timer ticks only while requests arrive, so an idle server stays idle. Under uvloop timers
keep millisecond time, so lateness below about a millisecond reads as 0: give --max-loop-lag several.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

TICK_S = 0.005
WINDOW_TICKS = 4  # lateness must last this many ticks in a row: one stall (a large response encoded on the
# loop, a garbage collection) makes one tick late, a loop with more work than time makes every tick late
IDLE_S = 1.0  # no request for this long: the timer stops until the next one


class LoopLag:
    """Sustained lateness of a periodic timer on the running loop, in seconds: the least lateness of the last
    ``WINDOW_TICKS`` ticks (0 until that many ticks ran since the server was last idle)."""

    def __init__(self, tick_s: float = TICK_S, window: int = WINDOW_TICKS, idle_s: float = IDLE_S) -> None:
        self.tick_s, self.idle_s = tick_s, idle_s
        self._late: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._last_request = 0.0

    @property
    def seconds(self) -> float:
        return min(self._late) if len(self._late) == self._late.maxlen else 0.0

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def request_seen(self) -> None:
        """Called (on the loop) for every request: keeps the timer running, or starts it again."""
        self._last_request = time.monotonic()
        if self._wake is not None and not self._wake.is_set():
            self._wake.set()

    def observe(self, late: float) -> None:
        self._late.append(late)

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            if time.monotonic() - self._last_request > self.idle_s:
                self._late.clear()
                wake.clear()
                await wake.wait()
            expected = time.monotonic() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self.observe(max(0.0, time.monotonic() - expected))
