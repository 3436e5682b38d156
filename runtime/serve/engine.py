"""The inference workers of one model: a queue shared by all requests, batches formed across requests.

The event loop tokenises (in a thread pool), checks the cache, and admits a request's texts into the
model's queue, or refuses them at once when the queue already holds more work than drains within the
queue-time budget (429 beats a timeout: the client can retry elsewhere now). K worker threads (the
``Embedder``'s ``workers``: K graph runs in flight on one session) take queued texts whenever one is free
(no fixed wait when idle), drop the texts of requests that timed out or whose client left, and form batches
by the runtime's own rules (length-sorted, token budget, no text under half the batch's longest), so a text
is fed to the graph exactly as ``Embedder.embed`` would feed it and gets the same vector whatever shares its
batch.

Which batch a free worker takes: the one of the shortest texts (a query does not wait behind a queued
512-token document, whose run takes ten times as long), unless the oldest waiting text has waited a quarter
of the queue-time budget, whose batch then goes first (nothing starves). How many: while other workers are
idle, a worker takes its share of the queue (the queued texts divided by the free workers), so two queued
queries run on two workers at once instead of one after the other; and never more than run within a quarter
of the budget by the cost model (``MAX_RUN_SHARE``), because a batch's texts are answered only when its run
ends. While queries keep arriving (requests of short texts only, at least ``QUERY_STREAM`` in the last
second), long batches (a text over ``LONG_TOKENS``) run on at most K - 1 workers at once, so a query finds a
worker within the time of a short run, not of a 512-token one. A request that mixes short and long texts does not count: keeping a worker from
its own long texts would only make it later.

The lone lane (``ModelSession.open_lone_session``): a batch that is all the work there is (every worker idle,
nothing else queued) while the work begun in the last second fills at most ``LONE_MAX_BUSY`` of the workers
runs on the model's second session, whose threads span several cores and spin between runs: a query alone
then takes the latency of every core instead of one, at low load, where the cores are free. Under load batches
run on the workers' one-thread session, which gets the most texts per second from the cores; the lane's
threads stop spinning ~35 ms after its last run, so an idle server uses no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from ..batching import pad_batch, plan_batches
from ..errors import EmbedderError
from ..pairs import segment_ids
from ..session import ModelSession
from .budget import QueueBudget
from .cache import VectorCache
from .cost import BatchCost
from .errors import QueueFull, WarmUpError
from .metrics import Metrics

log = logging.getLogger("runtime.serve")

LONG_TOKENS = 128  # a batch whose longest text is over this is long: a worker is kept free of them for queries
QUERY_STREAM = 5  # ... while at least this many requests of short texts only arrived within the last second
_QUERY_WINDOW_S = 1.0
SHED_LOG_EVERY_S = 10.0  # at most one log line about refused requests per model this often
MAX_RUN_SHARE = 0.25  # a batch may take at most this share of the queue-time budget (by the cost model)
LONE_MAX_BUSY = 0.2  # the lone lane runs while the work begun in the last second fills at most this share of the workers
_LOAD_WINDOW_S = 1.0



@dataclass(eq=False)
class Job:
    """The texts of one request for one model. The worker fills ``vectors``; the handler awaits ``future``.

    ``remaining`` and the timings are written by the worker thread only; ``cancelled`` (the reason: "deadline"
    or "disconnected") by the event loop only (one attribute store; the worker reads it before each batch)."""

    n: int
    dim: int
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: np.ndarray = field(init=False)
    remaining: int = 0
    cancelled: str | None = None
    queue_time: float = 0.0
    inference_time: float = 0.0
    predicted: float = 0.0  # seconds from admission to done, by the cost model (what the budget is checked on)
    error: Exception | None = None
    heads: bool = False  # bge-m3: the job also wants each row's lexical weights and ColBERT matrix
    lexical: list[dict[int, float]] = field(init=False)
    colbert: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.vectors = np.empty((self.n, self.dim), dtype=np.float32)
        self.lexical = [{} for _ in range(self.n)] if self.heads else []
        self.colbert = [np.empty((0, 0), np.float32)] * self.n if self.heads else []

    def finish(self) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(eq=False, slots=True)
class Item:
    """One text of a job waiting for the model."""

    job: Job
    index: int  # position in the request
    ids: list[int]
    key: Hashable | None  # cache key, None when the cache is off
    enqueued: float
    segment: int = 0  # pairs read by a graph with token_type_ids: where segment 1 (the passage) starts


class ModelWorker:
    """Owns one model (an ``Embedder``, or a ``Reranker`` whose rows are pairs and whose output row is the
    logit) and the ``model.workers`` threads that run it. Admission and queue depth live here, one queue for
    all the threads."""

    def __init__(
        self,
        name: str,
        embedder: ModelSession,
        cache: VectorCache,
        metrics: Metrics,
        *,
        max_batch_size: int | None,
        max_queue_time: float | None,
        max_queue_tokens: int | None,
        latency_target: float | None = None,
    ) -> None:
        self.name = name
        self.embedder = embedder
        self.cache = cache
        default_size, self._max_batch_tokens, self._pad_multiple = embedder.batch_limits
        self._unpadded_past = embedder.unpadded_past
        self._max_batch_size = max_batch_size or default_size
        # admission compares its estimate with budget.seconds (fixed, or measured against a latency target);
        # the batch cap and the starvation rule keep the budget's starting value, so batches do not change
        # shape as the measured budget moves
        self.budget = QueueBudget(max_queue_time, latency_target)
        self._max_queue_time = self.budget.seconds
        self._max_run_s = self._max_queue_time * MAX_RUN_SHARE
        self._max_queue_tokens = max_queue_tokens
        self._pad_id = embedder.manifest.pad_token_id
        self._max_length = embedder.max_length
        self._token_types = embedder.reads_token_types
        self._pending: list[Item] = []
        self._queued_tokens = 0
        self._queued_sq = 0  # sum of squared lengths of the queued texts (attention's share of the cost)
        self.cost = BatchCost()
        # on CUDA a batch shape's first run pays one-off costs (memory the arena grows by, kernel choices): it
        # does not say what the next run of that shape will take, so it does not move the cost model
        self._cuda = embedder.device == "cuda"
        self._shapes_seen: set[tuple[int, int]] = set()
        self._workers = embedder.workers
        self._busy_until = [0.0] * self._workers  # per worker: monotonic time its running batch should end
        self._idle = self._workers
        self._queries: deque[float] = deque()  # arrival times of requests of short texts only, last second
        self._long = [False] * self._workers  # per worker: is its running batch long?
        self._lone_threads = 0 if self._cuda else embedder.lone_threads
        self._lone = [False] * self._workers  # per worker: does its running batch run on the lone lane?
        self._recent: deque[tuple[float, float]] = deque()  # (start, cost-model seconds) of batches, last second
        self._recent_s = 0.0
        self.lone_runs = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, args=(k,), name=f"infer-{name}-{k}", daemon=True)
                         for k in range(self._workers)]
        m = metrics
        self._m_queue_s = m.queue_seconds.labels(name)
        self._m_infer_s = m.inference_seconds.labels(name)
        self._m_batch_texts = m.batch_texts.labels(name)
        self._m_batch_tokens = m.batch_tokens.labels(name)
        self._m_queue_texts = m.queue_texts.labels(name)
        self._m_queue_tokens = m.queue_tokens.labels(name)
        self._m_embedded = m.embedded_texts.labels(name)
        self._m_dropped = {r: m.dropped_texts.labels(name, r) for r in ("deadline", "disconnected", "failed")}
        self._m_shed = m.shed_requests.labels(name)
        self._m_busy = m.busy_workers.labels(name)
        self._m_lone = m.lone_runs.labels(name)
        self._shed_logged, self._shed_since_log = -SHED_LOG_EVERY_S, 0
        self._m_budget = m.queue_budget.labels(name)
        self._m_tail = m.tail_admitted.labels(name)
        self._m_budget.set(self.budget.seconds)
        m.workers.labels(name).set(self._workers)

    # -- lifecycle ---------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Runs the largest buffers in first, then a few batch shapes, timed, to fit the cost model admission
        control uses.

        On CPU the first run is one text at the longest length. On CUDA a shape's first run also pays for
        what the memory arena must grow by: the first GPU load run (bge-large fp16, H200) timed its warm-up's
        32 x 32 batch at 93 ms where a warm 64 x 128 batch takes 12 ms, so the fitted cost model priced every
        queue 10-20x too high (429s at a quarter of the load a naive server carried) and each new batch shape
        in the first minutes of load paid the same. So on CUDA the first run is the largest batch the server
        forms (its token budget at the longest length: every smaller batch then fits in memory the arena
        already holds), and every timed shape runs once untimed before it is timed."""
        L, size, budget = self._max_length, self._max_batch_size, self._max_batch_tokens
        cuda = self._cuda
        token = self.embedder.tokenize(["样"]).ids[0][1:-1] or [self._pad_id]  # one ordinary token id
        first = (max(1, min(size, budget // max(L, 1))), L) if cuda else (1, L)
        shapes = [first, (1, L), (1, 8), (1, 32), (4, 32), (16, 32), (32, 32), (1, 128), (8, 128), (2, L)]
        samples = []
        for i, (n, length) in enumerate(shapes):
            n, length = max(1, min(n, size, budget // max(length, 1))), min(length, L)
            ids = np.full((n, length), token[0], dtype=np.int64)
            mask = np.ones_like(ids)
            self._shapes_seen.add((n, length))
            runs = (1 if n * length >= 1024 else 3) + (1 if cuda and i > 0 else 0)  # small: the fastest of 3
            times = [self._warm_run(ids, mask) for _ in range(runs)]
            elapsed = min(times[1:] if cuda and i > 0 else times)  # on CUDA a shape's first run is not timed
            if i > 0:
                samples.append((n, length, elapsed))
        self.cost.fit(samples)
        if self._lone_threads:  # the lane's session pays its first-run costs here, not on a user's query
            for n, length in ((1, L), (1, 32), (1, 32)):
                ids = np.full((n, length), token[0], dtype=np.int64)
                self._warm_run(ids, np.ones_like(ids), lone=True)

    def _warm_run(self, ids: np.ndarray, mask: np.ndarray, lone: bool = False) -> float:
        """One timed warm-up run; a failure names the batch and what to change (TEI's warm-up, which also runs
        the largest batch first, fails the same way: at start-up rather than under load)."""
        t0 = time.perf_counter()
        try:
            self.embedder.run_tokens(ids, mask, lone=lone)
        except EmbedderError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types (out of device memory among them)
            raise WarmUpError(
                f"model {self.name!r}: a warm-up batch of {ids.shape[0]} x {ids.shape[1]} tokens failed: {exc}. "
                "The largest batch this server forms is --batch-size rows and --max-batch-tokens padded tokens; "
                "lower --max-batch-tokens until it fits in the device's memory"
            ) from exc
        return time.perf_counter() - t0

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    # -- admission (event loop) --------------------------------------------------------------
    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def queue_seconds(self, own_texts: int = 0, own_tokens: int = 0, own_sq: int = 0) -> float:
        """Estimated time until the queued work (and ``own``, a request joining it) is done: the rest of the
        running batches, then the queued texts in batches, by the cost model, shared by the K workers (the
        cost model's scale follows how long runs take when K of them share the cores)."""
        now = time.monotonic()
        running = sum(max(0.0, b - now) for b in self._busy_until)
        queued = self.cost.drain_seconds(len(self._pending) + own_texts, self._queued_tokens + own_tokens,
                                         self._queued_sq + own_sq, self._max_batch_size)
        return (running + queued) / self._workers

    def submit(self, job: Job, rows: list[tuple[int, list[int], Hashable | None]],
               segments: list[int] | None = None) -> None:
        """Queue ``rows`` (index in request, ids, cache key; for pairs read with token types, ``segments``
        gives each row's passage start) of ``job``, or raise ``QueueFull`` when the work
        ahead of it (the running batch and the queue) would take longer than the budget. A request is
        admitted whole or not at all; with ``--max-queue-tokens`` the limit is on queued tokens instead, and
        a request always gets in when the queue is empty (the per-request token limit bounds it)."""
        tokens = sum(len(ids) for _, ids, _ in rows)
        sq = sum(len(ids) ** 2 for _, ids, _ in rows)
        now = time.monotonic()
        with self._cond:
            budget = self.budget.seconds
            if self._max_queue_tokens is None:
                job.predicted = self.queue_seconds(len(rows), tokens, sq)
            if self._pending:
                if self._max_queue_tokens is not None:
                    if self._queued_tokens + tokens > self._max_queue_tokens:
                        self._shed(f"{self._queued_tokens} tokens queued, limit {self._max_queue_tokens} "
                                   "(--max-queue-tokens)", self.queue_seconds())
                else:
                    # when would this request be done: the running batch, the work queued ahead, and its own
                    # texts, which join the queued ones in batches. Its own share counts at most half the budget,
                    # so a request that is big by itself still gets in when little is queued ahead of it.
                    ahead = self.queue_seconds()
                    done = job.predicted
                    charged = ahead + min(done - ahead, budget / 2)
                    # an estimate over budget is acted on once the queue shows it: its oldest text has waited a quarter
                    # of the budget longer than one run of its own takes (a text waits that long for a busy worker even
                    # on a half-idle server, and on a large model one run is a quarter of the budget by itself), or the
                    # estimate is twice the budget. A clump of requests that arrived together (a Poisson burst, or the
                    # event loop got the CPU back after a run) drains and is not refused for the estimate's noise.
                    head = self._pending[0]
                    oldest = now - head.enqueued
                    patience = budget / 4 + self.cost.predict(1, len(head.ids))
                    if (charged > budget and (oldest > patience or charged > 2 * budget)
                            and not self._tail_admit(charged, now)):
                        source = ("--latency-target less the overshoot measured on recent requests"
                                  if self.budget.adaptive else "--max-queue-time")
                        self._shed(f"its texts would be done in about {done * 1000:.0f} ms ({ahead * 1000:.0f} ms "
                                   f"of work queued ahead), over the budget of {budget * 1000:.0f} ms ({source})",
                                   ahead)
            self.budget.admitted(now)
            job.remaining = len(rows)
            if all(len(ids) <= LONG_TOKENS for _, ids, _ in rows):
                self._queries.append(now)
            if segments is None:
                self._pending.extend(Item(job, i, ids, key, now) for i, ids, key in rows)
            else:
                self._pending.extend(Item(job, i, ids, key, now, seg) for (i, ids, key), seg in zip(rows, segments))
            self._queued_tokens += tokens
            self._queued_sq += sq
            self._m_queue_texts.set(len(self._pending))
            self._m_queue_tokens.set(self._queued_tokens)
            self._cond.notify()

    def _tail_admit(self, estimate: float, now: float) -> bool:
        """An over-budget request goes in on the latency target's tail (``QueueBudget.admit_over_budget``)."""
        if not self.budget.admit_over_budget(estimate, now):
            return False
        self._m_tail.inc()
        return True

    def observe_latency(self, job: Job, elapsed: float) -> None:
        """Event loop: ``job``'s request was answered ``elapsed`` seconds after it arrived (feeds the measured
        budget of ``--latency-target``)."""
        if self.budget.adaptive:
            self.budget.observe(job.predicted, elapsed)
            self._m_budget.set(self.budget.seconds)

    def _shed(self, reason: str, wait_s: float) -> None:
        self._m_shed.inc()
        self._shed_since_log += 1
        now = time.monotonic()
        if now - self._shed_logged >= SHED_LOG_EVERY_S:  # an operator sees why, without a line per refusal
            log.warning("model %s: %d request(s) refused with 429 since the last such line; the latest: %s; "
                        "%d texts queued, runs taking %.2fx the warm-up cost model", self.name,
                        self._shed_since_log, reason, len(self._pending), self.cost.scale)
            self._shed_logged, self._shed_since_log = now, 0
        raise QueueFull(max(1, math.ceil(wait_s)), reason)

    # -- the worker thread -------------------------------------------------------------------
    def _loop(self, k: int) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:  # stopping and nothing left
                    return
                batch = self._take_batch(k)
                if batch:
                    self._idle -= 1
                    self._m_busy.set(self._workers - self._idle)
                    if self._pending:  # more left: another idle worker may take its share
                        self._cond.notify()
                elif self._pending:  # kept free for queries: wait for one, or for a worker to finish
                    self._cond.wait(_QUERY_WINDOW_S)
                    continue
            if batch:
                try:
                    self._run(k, batch)
                finally:
                    with self._cond:
                        self._idle += 1
                        self._busy_until[k] = 0.0
                        self._long[k] = False
                        self._lone[k] = False
                        self._m_busy.set(self._workers - self._idle)
                        self._cond.notify_all()  # a worker kept free of long batches may take one now

    def _query_stream(self, now: float) -> bool:
        """Under the lock: did at least QUERY_STREAM requests of short texts only arrive in the last second?"""
        while self._queries and now - self._queries[0] > _QUERY_WINDOW_S:
            self._queries.popleft()
        return len(self._queries) >= QUERY_STREAM

    def _take_batch(self, k: int) -> list[Item]:
        """Under the lock: drop dead texts, then take the batch of the shortest texts (or of the oldest text,
        once it has waited a quarter of the budget), at most this worker's share of the queue."""
        now = time.monotonic()
        alive: list[Item] = []
        for it in self._pending:
            job = it.job
            reason = job.cancelled or ("failed" if job.error is not None else None) or (
                "deadline" if now > job.deadline else None)
            if reason is not None:
                self._queued_tokens -= len(it.ids)
                self._queued_sq -= len(it.ids) ** 2
                self._m_dropped[reason].inc()
            else:
                alive.append(it)
        if not alive:
            self._pending = []
            self._m_queue_texts.set(0)
            self._m_queue_tokens.set(self._queued_tokens)
            return []
        if len(alive) == 1:
            chosen, rest = alive, []
        else:
            lengths = np.fromiter((len(it.ids) for it in alive), dtype=np.int64, count=len(alive))
            share = math.ceil(len(alive) / max(1, self._idle))  # the idle workers split the queue
            # a batch's texts are all answered when its run ends: no run may take more than a quarter of the
            # budget (by the cost model, at the longest queued length), or a text admitted within the budget
            # would still miss it by one long batch
            tokens = min(self._max_batch_tokens, self.cost.tokens_within(self._max_run_s, int(lengths.max())))
            plan = plan_batches(lengths, min(self._max_batch_size, share), tokens, self._unpadded_past)
            # alive is in arrival order, so index 0 is the oldest text
            if now - alive[0].enqueued > self._max_queue_time / 4:
                pick = next(b for b in plan if (b == 0).any())  # it has waited long enough: its batch now
            else:  # the batch of the shortest texts; of two alike, the one holding the older text
                pick = min(plan, key=lambda b: (int(lengths[b].max()), int(b.min())))
            taken = np.zeros(len(alive), dtype=bool)
            taken[pick] = True
            chosen = [alive[i] for i in sorted(pick.tolist())]
            rest = [it for it, t in zip(alive, taken) if not t]
        longest = max(len(it.ids) for it in chosen)
        if longest > LONG_TOKENS and sum(self._long) >= self._workers - 1 > 0 and self._query_stream(now):
            self._pending = alive  # keep this worker for the queries that keep arriving
            return []
        self._pending = rest
        self._queued_tokens -= sum(len(it.ids) for it in chosen)
        self._queued_sq -= sum(len(it.ids) ** 2 for it in chosen)
        predicted = self.cost.predict(len(chosen), longest)
        self._busy_until[k] = now + predicted
        self._long[k] = longest > LONG_TOKENS
        self._lone[k] = self._lone_fits(now, bool(rest))
        self._recent.append((now, predicted))
        self._recent_s += predicted
        self._m_queue_texts.set(len(rest))
        self._m_queue_tokens.set(self._queued_tokens)
        return chosen

    def _lone_fits(self, now: float, others_queued: bool) -> bool:
        """Under the lock, before this worker counts as busy: does its batch go to the lone lane? Only when it
        is all the work there is and the work begun in the last second (by the cost model, one thread a run)
        fills at most LONE_MAX_BUSY of the workers: past that a spinning lane would take the cores the
        workers need."""
        while self._recent and now - self._recent[0][0] > _LOAD_WINDOW_S:
            self._recent_s -= self._recent.popleft()[1]
        if not self._recent:
            self._recent_s = 0.0  # no float drift across idle periods
        if not self._lone_threads or others_queued or self._idle < self._workers:
            return False
        return self._recent_s <= LONE_MAX_BUSY * self._workers * _LOAD_WINDOW_S

    def _run(self, k: int, batch: list[Item]) -> None:
        ids, mask = pad_batch([it.ids for it in batch], self._pad_id, self._pad_multiple, self._max_length)
        types = None
        if self._token_types:
            types = segment_ids([len(it.ids) for it in batch], [it.segment or len(it.ids) for it in batch], ids.shape)
        start = time.monotonic()
        t0 = time.perf_counter()
        # a batch holding any bge-m3 request fetches the sparse and ColBERT outputs for all its rows (one run;
        # the other rows just ignore them)
        heads = any(it.job.heads for it in batch)
        lone = self._lone[k]
        try:
            if heads:
                out = self.embedder.run_tokens_m3(ids, mask, lone=lone)  # type: ignore[attr-defined]
                vectors = out.dense
            else:
                vectors = self.embedder.run_tokens(ids, mask, types, lone=lone)
        except EmbedderError as exc:  # e.g. a non-finite vector: fail these requests, keep serving
            log.error("model %s: batch of %d failed: %s", self.name, len(batch), exc)
            for it in batch:
                if it.job.error is None:
                    it.job.error = exc
                    it.job.finish()
            return
        elapsed = time.perf_counter() - t0
        shape = (int(ids.shape[0]), int(ids.shape[1]))
        if lone:  # faster than the workers' runs the cost model prices (admission counts on those)
            self.lone_runs += 1
            self._m_lone.inc()
        elif not self._cuda or shape in self._shapes_seen:
            self.cost.observe(shape[0], shape[1], elapsed)
        else:
            self._shapes_seen.add(shape)
        self._m_infer_s.observe(elapsed)
        self._m_batch_texts.observe(len(batch))
        self._m_batch_tokens.observe(ids.size)
        self._m_embedded.inc(len(batch))
        seen: set[int] = set()
        for row, it in enumerate(batch):
            job = it.job
            job.vectors[it.index] = vectors[row]
            if job.heads:
                job.lexical[it.index] = out.sparse[row]
                job.colbert[it.index] = out.colbert[row]
            if it.key is not None:
                self.cache.put(it.key, vectors[row])
            wait = start - it.enqueued
            if wait > job.queue_time:
                job.queue_time = wait
            if id(job) not in seen:
                seen.add(id(job))
                job.inference_time += elapsed
            job.remaining -= 1
            if job.remaining == 0:
                self._m_queue_s.observe(job.queue_time)
                job.finish()
