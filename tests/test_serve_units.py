"""The server's parts in process: options and environment, request parsing, the cache, and the worker's
queue (admission, oldest-first batches, dropped work) on a real tiny model."""

from __future__ import annotations

import asyncio
import itertools
import time
import warnings

import numpy as np
import pytest

from runtime import Embedder
from runtime.serve.cache import VectorCache
from runtime.serve.config import parse_args
from runtime.serve.cost import PAD_FACTOR, BatchCost
from runtime.serve.engine import LONE_MAX_BUSY, QUERY_STREAM, Job, ModelWorker
from runtime.serve.errors import ApiError, QueueFull, WarmUpError
from runtime.serve.metrics import Metrics
from runtime.providers import usable_cores
from runtime.serve.protocol import parse_openai, parse_tei

from .helpers import chinese_text


# -- options ---------------------------------------------------------------------------------------
def test_options_from_environment_and_command_line(monkeypatch, tmp_path):
    monkeypatch.setenv("BGE_SERVE_MODEL", f"a={tmp_path}/x {tmp_path}/y")
    monkeypatch.setenv("BGE_SERVE_PORT", "9001")
    monkeypatch.setenv("BGE_SERVE_MAX_QUEUE_TIME", "0.05")
    monkeypatch.setenv("BGE_SERVE_SPINNING", "true")
    cfg = parse_args([])
    assert [(m.name, m.path.name) for m in cfg.models] == [("a", "x"), ("y", "y")]
    assert cfg.port == 9001 and cfg.max_queue_time == 0.05 and cfg.spinning is True
    assert cfg.queue_time_budget == 0.05
    cfg = parse_args(["--model", f"b={tmp_path}", "--port", "9002", "--request-timeout", "8"])
    assert [m.name for m in cfg.models] == ["b"] and cfg.port == 9002
    monkeypatch.delenv("BGE_SERVE_MAX_QUEUE_TIME")
    assert parse_args(["--model", str(tmp_path), "--request-timeout", "8"]).queue_time_budget == 4.0
    cfg = parse_args(["--model", str(tmp_path), "--latency-target", "0.1"])
    assert cfg.latency_target == 0.1 and cfg.queue_time_budget == pytest.approx(0.07)
    with pytest.raises(SystemExit):  # two ways to set one budget
        parse_args(["--model", str(tmp_path), "--latency-target", "0.1", "--max-queue-time", "0.05"])


@pytest.mark.parametrize("argv,env,message", [
    (["--model", "a=x", "--model", "a=y"], {}, "unique"),
    (["--model", "a=x"], {"BGE_SERVE_PORT": "eighty"}, "PORT"),
    (["--model", "a=x"], {"BGE_SERVE_DEVICE": "tpu"}, "DEVICE"),
    (["--model", "a=x", "--cache-size", "-1"], {}, ">= 0"),
    (["--model", "a=x", "--request-timeout", "0"], {}, "> 0"),
])
def test_bad_options_exit_with_the_reason(monkeypatch, capsys, argv, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# -- request bodies --------------------------------------------------------------------------------
def test_openai_body_forms():
    assert parse_openai({"input": "a"}, 10).texts == ["a"]
    assert parse_openai({"input": [1, 2, 3]}, 10).token_ids == [[1, 2, 3]]
    assert parse_openai({"input": [[1], [2, 3]]}, 10).token_ids == [[1], [2, 3]]
    r = parse_openai({"input": ["a"], "input_type": "query", "encoding_format": "base64", "dimensions": 64,
                      "user": "u", "truncate": False}, 10)
    assert r.query and r.encoding == "base64" and r.dimensions == 64 and r.long_text == "error"
    assert parse_openai({"input": "a"}, 10).long_text == "truncate"
    assert parse_openai({"input": "a", "truncate": False, "long_text": "chunk"}, 10).long_text == "chunk"
    for bad in ({"input": [True]}, {"input": "a", "dimensions": True}, {"input": "a", "truncate": "no"},
                {"input": [[1, 2.5]]}, {"input": [[]]}):
        with pytest.raises(ApiError) as exc:
            parse_openai(bad, 10)
        assert exc.value.status == 400
    with pytest.raises(ApiError) as exc:
        parse_openai({"input": ["a"] * 11}, 10)
    assert exc.value.status == 413


def test_tei_body_defaults():
    r = parse_tei({"inputs": ["a", "b"]}, 10)
    assert r.texts == ["a", "b"] and r.long_text == "error" and r.normalize and not r.query
    assert parse_tei({"inputs": "a", "prompt_name": "query", "truncation_direction": "Right"}, 10).query


# -- cache -----------------------------------------------------------------------------------------
def test_cache_is_lru_and_read_only():
    c = VectorCache(2)
    c.put("a", np.ones(3))
    c.put("b", np.zeros(3))
    assert c.get("a") is not None  # a is now the most recent
    c.put("c", np.ones(3))
    assert c.get("b") is None and c.get("a") is not None and len(c) == 2
    with pytest.raises(ValueError):
        c.get("a")[0] = 5
    off = VectorCache(0)
    off.put("a", np.ones(3))
    assert off.get("a") is None


# -- the cost model ------------------------------------------------------------------------------------
def test_cost_model_fits_runs_and_follows_the_machine():
    a, b, c = 0.002, 1e-5, 1e-8
    truth = lambda n, L: a + b * n * L + c * n * L * L  # noqa: E731
    cost = BatchCost()
    cost.fit([(n, L, truth(n, L)) for n, L in [(1, 8), (1, 32), (4, 32), (32, 32), (1, 128), (8, 128), (2, 512)]])
    np.testing.assert_allclose(cost.coef, [a, b, c], rtol=1e-6)
    # 40 one-text queries of 30 tokens drain in two runs of 32, not in 40 runs' fixed cost
    assert cost.drain_seconds(40, 1200, 40 * 900, 32) == pytest.approx(2 * a + PAD_FACTOR * (b * 1200 + c * 36000))
    for _ in range(100):  # the machine got twice as slow (another process, a throttled CPU)
        cost.observe(8, 128, 2 * truth(8, 128))
    assert cost.predict(8, 128) == pytest.approx(2 * truth(8, 128), rel=1e-3)
    # a run of 128-token rows may hold this many padded tokens and take at most 50 ms, at the scale now
    assert cost.tokens_within(0.05, 128) == int((0.05 - 2 * a) / (2 * (b + c * 128)))
    assert cost.tokens_within(1e-6, 128) == 128  # never less than one row
    with pytest.raises(ValueError):
        BatchCost().fit([])


# -- the worker --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_emb(tiny_artifact):
    return Embedder(tiny_artifact, spinning=False)


def _worker(emb, **kw) -> ModelWorker:
    opts = {"max_batch_size": None, "max_queue_time": 10.0, "max_queue_tokens": None} | kw
    return ModelWorker("t", emb, VectorCache(0), Metrics(), **opts)


def _job(loop, n, dim, timeout=30.0) -> Job:
    return Job(n=n, dim=dim, deadline=time.monotonic() + timeout, loop=loop, future=loop.create_future())


class _AsIfCuda:
    """The tiny embedder, reporting device 'cuda' and recording the shape of every run (or failing them)."""

    def __init__(self, emb, fail: bool = False) -> None:
        self._emb, self._fail, self.shapes = emb, fail, []

    device = "cuda"

    def run_tokens(self, ids, mask, types=None, *, lone=False):
        assert not lone, "no lone lane on CUDA"
        self.shapes.append(ids.shape)
        if self._fail:
            raise RuntimeError("CUDA failure 2: out of memory")
        return self._emb.run_tokens(ids, mask, types)

    def __getattr__(self, name):
        return getattr(self._emb, name)


def test_cuda_warm_up_runs_the_largest_batch_first_and_times_second_runs(tiny_emb):
    """On CUDA a shape's first run pays for the memory the arena grows by (H200, bge-large fp16: a 32 x 32
    batch 93 ms in the warm-up, a warm 64 x 128 one 12 ms), so the warm-up runs the largest batch the server
    forms first and fits the cost model on each shape's second run; a failing run is a typed error that says
    which limit to lower."""
    fake = _AsIfCuda(tiny_emb)
    w = _worker(fake, max_batch_size=64)
    w.warm_up()
    size, budget, L = 64, w._max_batch_tokens, w._max_length
    assert fake.shapes[0] == (min(size, budget // L), L)
    # every shape after the first runs at least twice in a row (one untimed run, then the timed ones)
    runs = [(shape, len(list(group))) for shape, group in itertools.groupby(fake.shapes[1:])]
    assert len(runs) >= 8 and all(count >= 2 for _, count in runs), runs
    assert w.cost.predict(32, 32) > 0
    # a batch shape's first run on CUDA leaves the cost model's scale alone; its second run moves it
    async def two_runs():
        loop = asyncio.get_running_loop()
        scales = [w.cost.scale]
        for _ in range(2):
            job = _job(loop, 3, tiny_emb.dim)
            w.submit(job, [(i, row, None) for i, row in enumerate(tiny_emb.tokenize(["一", "二三", "四五六"]).ids)])
            w._run(0, w._take_batch(0))
            scales.append(w.cost.scale)
        return scales

    before, after_first, after_second = asyncio.run(two_runs())
    assert after_first == before and after_second != after_first
    with pytest.raises(WarmUpError, match="--max-batch-tokens"):
        _worker(_AsIfCuda(tiny_emb, fail=True)).warm_up()


def test_worker_vectors_equal_embed_short_texts_first_until_one_waited(tiny_emb):
    """A free worker runs the batch of the shortest texts (a query does not wait behind a 512-token
    document), unless the oldest text has waited a quarter of the budget: then its batch goes first."""
    texts = ["长" * 300, "一个稍微长一点的句子" * 3, "中等长度的句子", "短", "也短"]
    ids = tiny_emb.tokenize(texts).ids

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb)
        jobs = [_job(loop, 1, tiny_emb.dim) for _ in texts]
        for job, row in zip(jobs, ids):
            w.submit(job, [(0, row, None)])
        first = w._take_batch(0)  # what the worker would run next: the two short texts, oldest first
        assert [it.job for it in first] == [jobs[3], jobs[4]]
        w._run(0, first)
        w._pending[0].enqueued -= 3.0  # the 300-character text has now waited 3 s, over 10 s / 4
        second = w._take_batch(0)
        assert [it.job for it in second] == [jobs[0]]
        w._run(0, second)
        w.start()
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 30)
        w.stop()
        return np.stack([j.vectors[0] for j in jobs])

    got = asyncio.run(run())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(got, tiny_emb.embed(texts), atol=1e-6)


def test_parallel_workers_split_the_queue_and_give_embed_vectors(tiny_artifact):
    """K workers on one session: idle workers split the queue (two queued texts run on two workers at
    once), and under concurrent load every text gets exactly ``Embedder.embed``'s vector."""
    emb = Embedder(tiny_artifact, spinning=False, workers=2)
    assert emb.workers == 2 and emb.threads == max(1, usable_cores() // 2)
    rng = np.random.default_rng(0)
    texts = [chinese_text(int(n), rng) for n in rng.integers(1, 120, size=300)]
    ids = emb.tokenize(texts).ids

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(emb)
        probe = [_job(loop, 1, emb.dim) for _ in range(4)]
        for job in probe:
            w.submit(job, [(0, ids[0], None)])
        assert len(w._take_batch(0)) == 2  # 4 queued, 2 idle workers: a share of 2
        w._pending.clear()
        w._queued_tokens = w._queued_sq = 0
        w._idle = 2
        w.start()
        jobs = []
        for start in range(0, len(texts), 7):  # requests of up to 7 texts, arriving while others run
            job = _job(loop, len(ids[start:start + 7]), emb.dim)
            w.submit(job, [(i, row, None) for i, row in enumerate(ids[start:start + 7])])
            jobs.append(job)
            await asyncio.sleep(0.001)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 60)
        w.stop()
        return np.concatenate([j.vectors for j in jobs])

    got = asyncio.run(run())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(got, Embedder(tiny_artifact).embed(texts), atol=1e-6)
        np.testing.assert_allclose(emb.embed(texts), got, atol=1e-6)  # embed itself runs 2 batches at once


def test_one_worker_is_kept_for_short_texts_while_they_keep_arriving(tiny_artifact):
    """With K workers, long batches run on at most K - 1 at once while queries keep arriving: a query finds a
    worker within the time of a short run. With no stream of queries, all K take long ones; a request that
    mixes short and long texts is no query."""
    emb = Embedder(tiny_artifact, spinning=False, workers=2)
    long_row, other_long, short_row = emb.tokenize(["长" * 300, "长" * 140, "短句"]).ids  # 2 long batches

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(emb)
        for row in (long_row, other_long, short_row):
            w.submit(_job(loop, 1, emb.dim), [(0, row, None)])
        for _ in range(QUERY_STREAM - 1):  # a stream of queries: QUERY_STREAM in the last second
            w.submit(_job(loop, 2, emb.dim), [(0, short_row, None), (1, short_row, None)])
        w.submit(_job(loop, 2, emb.dim), [(0, short_row, None), (1, long_row, None)])  # not a query
        w._pending = [it for it in w._pending if it.job.n == 1]  # the queries have been answered
        assert [len(it.ids) for it in w._take_batch(0)] == [len(short_row)]  # shortest first
        w._idle -= 1
        assert [len(it.ids) for it in w._take_batch(1)] == [len(other_long)]  # one long batch may run
        w._idle -= 1
        w._idle += 1  # worker 0 is done with the short text
        assert w._take_batch(0) == [] and len(w._pending) == 1  # kept free: a query arrived just now
        w._queries.popleft()  # one query fewer in the last second: no stream any more
        assert [len(it.ids) for it in w._take_batch(0)] == [len(long_row)]

    asyncio.run(run())


def test_lone_lane_takes_a_batch_that_finds_every_worker_idle_at_low_load(minilm_artifact):
    """A batch that is all the work there is, on an idle server whose last second was light, runs on the lone
    session (several spinning threads); with other texts queued, another worker busy, or a busy last second it
    runs on the workers' session. Its vectors are the workers' bit for bit, and its runs do not move the cost
    model (admission prices one-thread runs)."""
    emb = Embedder(minilm_artifact, spinning=False, workers=2)
    rows = emb.tokenize(["a lone query about the weather", "another one", "a third"]).ids
    with pytest.raises(ValueError, match="open_lone_session"):
        emb.run_tokens(*_padded(rows[:1]), lone=True)
    with pytest.raises(ValueError, match="at least 2 threads"):
        emb.open_lone_session(1)
    emb.open_lone_session(2)
    assert emb.lone_threads == 2
    for n in (1, 3):  # same numbers from either session (threads split rows and columns, never a sum)
        np.testing.assert_array_equal(emb.run_tokens(*_padded(rows[:n]), lone=True), emb.run_tokens(*_padded(rows[:n])))

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(emb)
        scale = w.cost.scale
        job = _job(loop, 1, emb.dim)
        w.submit(job, [(0, rows[0], None)])
        batch = w._take_batch(0)
        assert w._lone[0]  # alone, every worker idle, nothing begun in the last second
        w._run(0, batch)
        assert w.lone_runs == 1 and w.cost.scale == scale
        w._lone[0] = False
        for r in rows:  # three queued: the first taken leaves others queued
            w.submit(_job(loop, 1, emb.dim), [(0, r, None)])
        w._take_batch(0)
        assert not w._lone[0]
        w._pending.clear()
        w._queued_tokens = w._queued_sq = 0
        w._idle = 1  # another worker runs a batch
        w.submit(_job(loop, 1, emb.dim), [(0, rows[1], None)])
        w._take_batch(1)
        assert not w._lone[1]
        w._idle = 2
        w._recent.append((time.monotonic(), LONE_MAX_BUSY * 2 + 0.01))  # the last second: past the limit
        w._recent_s += LONE_MAX_BUSY * 2 + 0.01
        w.submit(_job(loop, 1, emb.dim), [(0, rows[2], None)])
        w._take_batch(0)
        assert not w._lone[0]

    asyncio.run(run())


def _padded(rows):
    from runtime.batching import pad_batch

    return pad_batch(rows, 0, 1, 512)


def test_no_batch_outlasts_a_quarter_of_the_budget(tiny_emb):
    """A batch's texts are answered when its run ends, so a free worker takes at most the texts that run
    within a quarter of the queue-time budget by the cost model (at least one), however many are queued."""
    async def run():
        loop = asyncio.get_running_loop()
        row = tiny_emb.tokenize(["一个短句"]).ids[0]
        per_text = 0.004  # the cost model says: 4 ms per text of this length, no fixed cost
        w = _worker(tiny_emb, max_queue_time=4 * 3 * per_text, max_batch_size=32)
        w.cost.coef = np.array([0.0, per_text / len(row), 0.0])
        w.submit(_job(loop, 20, tiny_emb.dim), [(i, row, None) for i in range(20)])
        w._idle = 1  # the other worker is busy: this one could take a full batch of 20
        sizes = []
        while w._pending:
            sizes.append(len(w._take_batch(0)))
        assert sizes == [3] * 6 + [2]
        w.cost.scale = 100.0  # the machine got very slow: one text per run, never none
        w.submit(_job(loop, 2, tiny_emb.dim), [(i, row, None) for i in range(2)])
        assert len(w._take_batch(0)) == 1

    asyncio.run(run())


def test_worker_refuses_past_its_queue_limit_and_drops_dead_work(tiny_emb):
    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb, max_queue_tokens=600)
        row = tiny_emb.tokenize(["长" * 298]).ids[0]  # 300 tokens
        big = _job(loop, 3, tiny_emb.dim)
        w.submit(big, [(i, row, None) for i in range(3)])  # 900 tokens: admitted, the queue was empty
        with pytest.raises(QueueFull) as exc:
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
        assert exc.value.retry_after_s >= 1 and "limit 600" in exc.value.reason
        big.cancelled = "disconnected"  # its client left: nothing of it may reach the model
        assert w._take_batch(0) == [] and w.queued_tokens == 0
        late = _job(loop, 1, tiny_emb.dim, timeout=-1)  # already past its deadline
        w.submit(late, [(0, row, None)])
        assert w._take_batch(0) == [] and w.queued_tokens == 0

    asyncio.run(run())


def test_admission_by_time_waits_for_the_queue_to_show_it(tiny_emb):
    """Over budget by the estimate alone is refused only once the queue's oldest text has waited a quarter
    of the budget more than one run takes, or when the estimate is twice the budget."""
    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb, max_queue_time=0.015, max_batch_size=32)
        w.cost.coef = np.array([0.01, 0.0, 0.0])  # 10 ms a run, whatever is in it
        row = tiny_emb.tokenize(["短句"]).ids[0]
        w.submit(_job(loop, 40, tiny_emb.dim), [(i, row, None) for i in range(40)])  # 2 runs queued: 20 ms
        w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])  # over budget, but the queue is fresh
        w._pending[0].enqueued -= 0.008  # a quarter of the budget (3.75 ms), but less than that plus one run (10 ms)
        w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])  # it may just be waiting for the busy worker
        w._pending[0].enqueued -= 1.0  # now the oldest text has waited a second: the queue is not draining
        with pytest.raises(QueueFull) as exc:
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
        assert "over the budget of 15 ms" in exc.value.reason
        w._pending[0].enqueued += 1.0
        w.submit(_job(loop, 60, tiny_emb.dim), [(i, row, None) for i in range(60)])  # fresh, 4 runs: 40 ms
        with pytest.raises(QueueFull):  # twice the budget: refused at once
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])

    asyncio.run(run())


def test_refusals_are_logged_once_per_interval_with_the_count(tiny_emb, caplog):
    """An operator sees why requests are refused, one line per model per SHED_LOG_EVERY_S, not one per 429."""
    from runtime.serve import engine

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb, max_queue_time=0.015, max_batch_size=32)
        w.cost.coef = np.array([0.01, 0.0, 0.0])  # 10 ms a run
        row = tiny_emb.tokenize(["短句"]).ids[0]
        w.submit(_job(loop, 100, tiny_emb.dim), [(i, row, None) for i in range(100)])  # 4 runs, 40 ms: over twice 15
        with caplog.at_level("WARNING", logger="runtime.serve"):
            for _ in range(3):
                with pytest.raises(QueueFull):
                    w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
            first = [r.getMessage() for r in caplog.records]
            w._shed_logged -= engine.SHED_LOG_EVERY_S  # the interval has passed
            with pytest.raises(QueueFull):
                w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
        lines = [r.getMessage() for r in caplog.records]
        assert len(first) == 1 and "1 request(s) refused" in first[0] and "100 texts queued" in first[0]
        assert len(lines) == 2 and "3 request(s) refused" in lines[1]  # the two held back and this one

    asyncio.run(run())


def test_measured_budget_follows_the_overshoot():
    """With a latency target the budget starts at 0.7 of it, then is the target less the p99 of how much
    longer than predicted the recent requests took, within 0.5-0.9 of the target."""
    from runtime.serve import budget as b

    fixed = b.QueueBudget(fixed=0.07)
    fixed.observe(0.01, 5.0)
    assert fixed.seconds == 0.07 and not fixed.adaptive
    with pytest.raises(ValueError):
        b.QueueBudget(fixed=0.07, target=0.1)
    with pytest.raises(ValueError):
        b.QueueBudget()
    q = b.QueueBudget(target=0.1)
    assert q.seconds == pytest.approx(0.07)
    for _ in range(b.MIN_SAMPLES - 1):
        q.observe(0.020, 0.025)  # 5 ms more than predicted
    assert q.seconds == pytest.approx(0.07)  # not enough requests measured yet
    q.observe(0.020, 0.025)
    assert q.seconds == pytest.approx(0.09)  # 100 - 5 ms, capped at 0.9 of the target
    for _ in range(b.WINDOW):
        q.observe(0.020, 0.045)  # runs got slower: 25 ms over
    assert q.overshoot == pytest.approx(0.025) and q.seconds == pytest.approx(0.075)
    for _ in range(b.WINDOW):
        q.observe(0.020, 0.200)  # far over: never below half the target
    assert q.seconds == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    over = rng.exponential(0.004, b.WINDOW)  # a spread: the budget leaves the p99 of it
    for o in over:
        q.observe(0.030, 0.030 + o)
    assert q.seconds == pytest.approx(0.1 - np.quantile(over, 0.99), abs=1e-9)


def test_admission_uses_the_measured_budget(tiny_emb, monkeypatch):
    """A request whose estimate passes 0.7 of the target is refused until the requests answered show the
    estimates hold; then the budget rises and it gets in. The refusal names --latency-target. (The
    target's tail allowance is off here: the next test holds it.)"""
    from runtime.serve import budget as b

    monkeypatch.setattr(b, "TAIL_SHARE", 0.0)

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb, max_queue_time=None, latency_target=0.1, max_batch_size=32)
        assert w.budget.seconds == pytest.approx(0.07)
        w.cost.coef = np.array([0.02, 0.0, 0.0])  # 20 ms a run, whatever is in it
        row = tiny_emb.tokenize(["短句"]).ids[0]
        assert w._workers == 1  # the fixture's Embedder: one worker
        w.submit(_job(loop, 96, tiny_emb.dim), [(i, row, None) for i in range(96)])  # 3 runs queued: 60 ms
        w._pending[0].enqueued -= 1.0  # the queue has shown it: over-budget estimates are acted on
        with pytest.raises(QueueFull) as exc:  # 80 ms with its own run: over 70
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
        assert "over the budget of 70 ms (--latency-target" in exc.value.reason
        done = _job(loop, 1, tiny_emb.dim)
        done.predicted = 0.060
        for _ in range(64):
            w.observe_latency(done, 0.064)  # answered 4 ms after the estimate
        assert w.budget.seconds == pytest.approx(0.09)
        job = _job(loop, 1, tiny_emb.dim)
        w.submit(job, [(0, row, None)])
        assert job.predicted == pytest.approx(0.08)

    asyncio.run(run())


def test_over_budget_requests_spend_half_the_p99_tail(tiny_emb):
    """With a latency target, a request estimated over the budget, up to 1.5x the target, still goes in while,
    counting it, at most 0.5% of the last minute's admissions did so; past 1.5x the target, or with the
    allowance spent, it is refused; a fixed --max-queue-time has no tail to spend."""
    from runtime.serve import budget as b

    fixed = b.QueueBudget(fixed=0.07)
    assert not fixed.admit_over_budget(0.08, 0.0)
    q = b.QueueBudget(target=0.1)
    assert not q.admit_over_budget(0.09, 0.0)  # nothing admitted yet: no share to spend
    for i in range(199):
        q.admitted(i / 100)
    assert not q.admit_over_budget(0.151, 2.0)  # past 1.5x the target: a 429 lets the client go elsewhere
    assert q.admit_over_budget(0.12, 2.0)  # 1 of 200, just past the target: the p99's tail
    q.admitted(2.0)
    assert not q.admit_over_budget(0.09, 2.0) and q.tail_admitted == 1  # 2 of 201: over 0.5%
    for _ in range(199):
        q.admitted(30.0)
    assert q.admit_over_budget(0.09, 30.0) and q.tail_admitted == 2  # 2 of 400
    q.admitted(30.0)
    assert not q.admit_over_budget(0.09, 61.5)  # the first two seconds' 199 fell out of the minute: 2 of 201
    assert not q.admit_over_budget(0.09, 200.0)  # a minute later nothing is left to count against

    async def run():
        loop = asyncio.get_running_loop()
        w = _worker(tiny_emb, max_queue_time=None, latency_target=0.1, max_batch_size=32)
        w.cost.coef = np.array([0.02, 0.0, 0.0])  # 20 ms a run
        row = tiny_emb.tokenize(["短句"]).ids[0]
        for _ in range(999):  # the last minute's admissions: 1,000 with the next, so 5 may go over the budget
            w.budget.admitted(time.monotonic())
        w.submit(_job(loop, 96, tiny_emb.dim), [(i, row, None) for i in range(96)])  # 3 runs queued: 60 ms
        w._pending[0].enqueued -= 1.0  # the queue has shown it
        for _ in range(5):  # 80 ms with its own run: over the 70 ms budget, within the 100 ms target
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
            it = w._pending.pop()  # (keep the queue as it was: each estimate stays 80 ms)
            w._queued_tokens, w._queued_sq = w._queued_tokens - len(it.ids), w._queued_sq - len(it.ids) ** 2
        with pytest.raises(QueueFull) as exc:  # the sixth: the allowance is spent
            w.submit(_job(loop, 1, tiny_emb.dim), [(0, row, None)])
        assert "over the budget of 70 ms" in exc.value.reason
        assert w._m_tail._value.get() == 5 and w.budget.tail_admitted == 5

    asyncio.run(run())


@pytest.mark.parametrize("package,module,extra", [("runtime.serve", "uvicorn", "serve"), ("runtime.bulk", "ray", "bulk")])
def test_missing_extra_names_it(package, module, extra):
    import subprocess
    import sys

    code = (f"import importlib.util as u; real = u.find_spec; "
            f"u.find_spec = lambda n, *a: None if n == {module!r} else real(n, *a)\n"
            f"try:\n    import {package}\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"`{extra}` extra ({module} not installed)" in out.stdout, out.stdout + out.stderr


# -- tokenisation lanes ----------------------------------------------------------------------------
def test_large_tokenisation_has_its_own_lane_and_admission():
    """Two huge requests occupy the large lane, not the small one: a small request runs at once. The large
    lane refuses a request whose characters would not be tokenised within the budget at its measured rate."""
    import threading

    from runtime.serve.tokenize import INLINE_CHARS, LARGE_CHARS, Tokenization

    lanes = Tokenization(workers=1, budget_s=1.0)
    release = threading.Event()

    def slow(tag: str) -> str:
        release.wait(10)
        return tag

    async def scenario() -> None:
        lanes.rate = 4 * LARGE_CHARS  # characters per second: 4 large requests fit in the 1 s budget
        first = asyncio.ensure_future(lanes.run(2 * LARGE_CHARS, slow, "big-1"))
        await asyncio.sleep(0.05)
        assert lanes.queued_chars == 2 * LARGE_CHARS
        assert await lanes.run(10, str.upper, "small") == "SMALL"  # not behind the big one
        # a query's worth is tokenised on the loop (a thread hop costs more); a bit more goes to a thread
        here = threading.get_ident()
        assert await lanes.run(INLINE_CHARS, threading.get_ident) == here
        assert await lanes.run(INLINE_CHARS + 1, threading.get_ident) != here
        second = asyncio.ensure_future(lanes.run(LARGE_CHARS + 1, slow, "big-2"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as refused:  # 3 + 2 large requests' worth: 1.25 s at that rate
            await lanes.run(2 * LARGE_CHARS, slow, "big-3")
        assert refused.value.retry_after_s >= 1 and "characters are queued" in refused.value.reason
        release.set()
        assert await first == "big-1" and await second == "big-2"
        assert lanes.queued_chars == 0
        # alone in the lane, a request is admitted whatever its size
        assert await lanes.run(100 * LARGE_CHARS, str, "alone") == "alone"

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        lanes.close()


def test_default_layout_is_per_core_for_embedders_and_one_wide_worker_for_rerankers(tmp_path):
    from runtime.serve.config import ModelSpec, ServeConfig

    cfg = ServeConfig(models=(ModelSpec("m", tmp_path),))
    cores = usable_cores()
    assert cfg.layout("cpu") == (cores, 1)
    assert cfg.layout("cpu", "reranker") == (1, cores)
    explicit = ServeConfig(models=(ModelSpec("m", tmp_path),), workers=2, threads=1)
    assert explicit.layout("cpu", "reranker") == (2, 1)  # flags win for every kind
    assert ServeConfig(models=(ModelSpec("m", tmp_path),), threads=1).layout("cpu", "reranker") == (cores, 1)


def test_lone_lane_is_on_by_default_where_workers_have_fewer_threads_than_the_cores(tmp_path):
    from runtime.serve.config import LONE_MAX_THREADS, ModelSpec, ServeConfig

    cores = usable_cores()
    cfg = ServeConfig(models=(ModelSpec("m", tmp_path),))
    assert cfg.lone_lane("cpu", 1) == (min(cores, LONE_MAX_THREADS) if cores > 1 else 0)
    assert cfg.lone_lane("cpu", cores) == 0  # a worker already runs on every core (rerankers' default)
    assert cfg.lone_lane("cuda", 1) == 0
    for flag, lone in ((0, 0), (1, 0), (3, 3)):
        assert ServeConfig(models=(ModelSpec("m", tmp_path),), lone_threads=flag).lone_lane("cpu", 1) == lone
    assert parse_args(["--model", str(tmp_path), "--lone-threads", "0"]).lone_threads == 0


def test_loop_lag_is_the_least_lateness_of_the_last_ticks_and_sleeps_when_idle():
    """One stall makes one tick late and is not lag; a loop with more work than time makes every tick late.
    With no request for ``idle_s`` the timer stops (an idle server stays idle) and forgets what it saw."""
    from runtime.serve.looplag import LoopLag

    lag = LoopLag(window=4)
    for late in (0.0, 0.5, 0.0, 0.0):
        lag.observe(late)
    assert lag.seconds == 0.0
    for late in (0.03, 0.02, 0.05, 0.04):
        lag.observe(late)
    assert lag.seconds == 0.02

    async def run() -> tuple[float, int, int]:
        lag = LoopLag(tick_s=0.002, window=4, idle_s=0.05)
        lag.start()
        lag.request_seen()
        await asyncio.sleep(0.03)
        busy = len(lag._late)
        await asyncio.sleep(0.15)  # past idle_s: parked, window cleared
        parked = len(lag._late)
        seconds = lag.seconds
        await lag.stop()
        return seconds, busy, parked

    seconds, busy, parked = asyncio.run(run())
    assert busy == 4 and parked == 0 and seconds == 0.0
