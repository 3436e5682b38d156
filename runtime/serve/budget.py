"""The queue-time budget admission control compares its estimate with.

Fixed (``--max-queue-time``): the operator picks it, about 0.7 of a latency SLO by this project's measurements.
That 0.3 of headroom is a guess at two things the cost model does not see: the time a request spends in the
server outside the queue (parsing, tokenising, the event loop getting the CPU back) and the estimate's own
error. Both depend on the model and the machine's state: on bge-small-zh a fixed 0.7 x 100 ms refused Poisson
bursts at 190 req/s whose p99 was 66 ms, and on bge-large-zh 0.7 x 500 ms refused a request at 9.5 req/s with
the admitted ones' p99 at 410 ms (docs/benchmarks.md).

With a latency target (``--latency-target``) the budget is measured instead: every answered request that
went through the queue reports how much longer it took in the server than admission predicted, and the
budget is the target less a high quantile of that overshoot over the recent requests. It rises towards the
target while estimates hold and falls when runs take longer than the model says (overload, a noisy
neighbour), so the headroom is the one this model needs on this machine now. It stays within
[MIN_SHARE, MAX_SHARE] of the target: never the whole target (the client's network and the send are not
seen), never less than half (a few slow outliers must not turn the server away from its whole load).

The target is a p99, so it has a tail to spend: a request whose estimate is over the budget, up to
``TAIL_CAP`` x the target, may still go in while, counting it, at most ``TAIL_SHARE`` of the admissions of the
last ``TAIL_SECONDS`` did so (about the span a p99 is read over by an operator's dashboard). The budget itself
leaves each admitted request about a 1% chance of finishing past the target, and most are estimated well below
it, so half a percent more at worse odds keeps the p99; what it buys is the Poisson burst near capacity, whose
few requests were refused while the admitted ones' p99 was half the target. Those requests are estimated just
past the target as often as just below it (bge-small-zh at 560-590 req/s: 1-5 of 17,000 refused at 102-115 ms
while the p99 was 57-61 ms), so the tail reaches past the target: its requests are by definition the ones
the p99 leaves out, and to the client an answer at 1.2x the target beats a 429 and a retry; past
``TAIL_CAP`` x the target the 429 lets it go elsewhere sooner. A burst comes in a second or two, so the share
is counted over a minute, not over the last few hundred requests. Under real overload the allowance is a
rounding error against what the budget sheds.
"""

from __future__ import annotations

from collections import deque

import numpy as np

INITIAL_SHARE = 0.7  # of the target, until enough requests have been measured
MIN_SHARE, MAX_SHARE = 0.5, 0.9
QUANTILE = 0.99  # the SLO is a p99: the overshoot that 1 request in 100 exceeds
WINDOW = 512  # recent requests the quantile is taken over
MIN_SAMPLES = 64  # before this many, the initial share stands
REFIT_EVERY = 32  # requests between two recomputations (a quantile of 512 floats costs ~20 us)
TAIL_SHARE = 0.005  # of recent admissions may go in over the budget: half the p99's 1%
TAIL_CAP = 1.5  # x the target: the latest estimate the tail takes
TAIL_SECONDS = 60  # the span the share is counted over, in one-second buckets


class QueueBudget:
    """Seconds of predicted completion time admission accepts. ``observe``, ``admitted`` and
    ``admit_over_budget`` are called on the event loop only; worker threads read ``seconds`` (one float)
    without a lock."""

    def __init__(self, fixed: float | None = None, target: float | None = None) -> None:
        if (fixed is None) == (target is None):
            raise ValueError("QueueBudget takes either a fixed budget or a latency target, not both or neither")
        value = fixed if fixed is not None else target
        if not value or value <= 0:
            raise ValueError(f"the queue-time budget must be positive seconds, got {value!r}")
        self.target = target
        self.seconds = fixed if fixed is not None else INITIAL_SHARE * target  # type: ignore[operator]
        self.overshoot = 0.0  # the quantile last measured (0 until MIN_SAMPLES)
        self._ring = np.zeros(WINDOW)
        self._n = 0
        # per second of the last TAIL_SECONDS: [second, requests admitted, of them over the budget]
        self._seconds: deque[list[int]] = deque()
        self._recent = [0, 0]  # the sums of the two counts over those seconds
        self.tail_admitted = 0  # how many, since the start

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def observe(self, predicted: float, elapsed: float) -> None:
        """A request admitted with ``predicted`` seconds of queued work ahead of it and its own was answered
        ``elapsed`` seconds after it arrived."""
        if self.target is None:
            return
        self._ring[self._n % WINDOW] = elapsed - predicted
        self._n += 1
        if self._n >= MIN_SAMPLES and self._n % REFIT_EVERY == 0:
            self.overshoot = max(0.0, float(np.quantile(self._ring[: min(self._n, WINDOW)], QUANTILE)))
            self.seconds = min(MAX_SHARE * self.target, max(MIN_SHARE * self.target, self.target - self.overshoot))

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        while self._seconds and self._seconds[0][0] <= second - TAIL_SECONDS:
            _, n, tail = self._seconds.popleft()
            self._recent[0] -= n
            self._recent[1] -= tail
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
        return self._seconds[-1]

    def admitted(self, now: float) -> None:
        """A request went in at ``now`` (monotonic seconds), whatever its estimate: the tail's share is
        counted over admissions (nothing to count with a fixed budget)."""
        if self.target is None:
            return
        self._bucket(now)[1] += 1
        self._recent[0] += 1

    def admit_over_budget(self, estimate: float, now: float) -> bool:
        """Whether a request estimated at ``estimate`` seconds, over the budget (and at most ``TAIL_CAP`` x the
        target), may still go in on the target's tail at ``now``; if so it is counted against the allowance
        (the caller then calls ``admitted``). Always no with a fixed budget."""
        if self.target is None or estimate > TAIL_CAP * self.target:
            return False
        bucket = self._bucket(now)
        if self._recent[1] + 1 > TAIL_SHARE * (self._recent[0] + 1):
            return False
        bucket[2] += 1
        self._recent[1] += 1
        self.tail_admitted += 1
        return True
