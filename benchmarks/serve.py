"""Open-loop serving benchmark: embedding servers side by side under Poisson load, on one machine.

    python -m benchmarks.serve                                  # bge-small-zh, both request mixes
    python -m benchmarks.serve --model-arch bge-large-zh --mix query
    python -m benchmarks.serve --quick --servers naive-ours --duration 2   # smoke test (tiny-zh)

Servers, each started alone as a subprocess on 127.0.0.1 with the same random-weight checkpoint and the
same number of intra-op threads:

- ``naive-st-torch``, ``naive-st-qint8``, ``naive-ours``: ``benchmarks.naive_server`` (FastAPI ``def``
  endpoint, one encode call per request, uvicorn defaults) over sentence-transformers torch, the
  sentence-transformers qint8 ONNX recipe (rebuilt in ``benchmarks.stock``, run through our tokenisation)
  and ``runtime.Embedder`` int8.
- ``infinity``: infinity-emb in its own venv (``benchmarks.infinity_peer``).
- ``ours``: ``python -m runtime.serve``.

Load is open loop: requests leave at precomputed, seeded Poisson arrival times whatever the answers do, and
latency is measured from the *scheduled* send time, so a server that queues cannot hide it. Each server
climbs a ladder of offered rates (doubling while it sustains p99 <= SLO with no failures, then refining in
<= 1.25x steps between the last good and first bad rate, then once at 2x its max sustainable rate).
Writes ``serve-<arch>-<mix>.{json,md,png}`` under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import datasets
from .common import SPEED_FLAGS, cpu_flag_set, cpu_name, save

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache"

SERVERS = ("naive-st-torch", "naive-st-qint8", "naive-ours", "infinity", "ours")
NAIVE = ("naive-st-torch", "naive-st-qint8", "naive-ours")
LABELS = {
    "naive-st-torch": "naive FastAPI + sentence-transformers torch",
    "naive-st-qint8": "naive FastAPI + ST qint8 ONNX recipe (optimum avx512_vnni preset rebuilt, our tokenisation)",
    "naive-ours": "naive FastAPI + runtime.Embedder int8",
    "infinity": "infinity-emb (optimum engine, own venv)",
    "ours": "runtime.serve int8",
}
CUDA_LABELS = {  # --device cuda
    "naive-st-torch": "naive FastAPI + sentence-transformers torch fp16 on the GPU",
    "naive-ours": "naive FastAPI + runtime.Embedder fp16 (CUDA provider)",
    "ours": "runtime.serve fp16 (CUDA provider)",
}
MIXES = ("query", "mix")
ARCHS = ("bge-small-zh", "bge-large-zh", "tiny-zh")
# p99 SLO per architecture and mix. A `mix` request carries 1-32 texts (~1,200 tokens on average, some of
# them 512-token news documents): alone it takes ~260 ms (p99 ~650 ms) through runtime.Embedder int8 on
# bge-small-zh here, and bge-large-zh costs ~24x the FLOPs per token, so its SLO is wider than a query's.
SLO_MS = {
    ("bge-small-zh", "query"): 100.0, ("bge-small-zh", "mix"): 1000.0,
    ("bge-large-zh", "query"): 500.0, ("bge-large-zh", "mix"): 20000.0,
    ("tiny-zh", "query"): 100.0, ("tiny-zh", "mix"): 100.0,
}
# First offered rate (req/s) of the adaptive ladder per architecture and mix: well under every server's
# capacity, so the ladder starts from a sustained rate and doubles up.
START_RPS = {
    ("bge-small-zh", "query"): 20.0, ("bge-small-zh", "mix"): 1.0,
    ("bge-large-zh", "query"): 2.0, ("bge-large-zh", "mix"): 0.1,
    ("tiny-zh", "query"): 50.0, ("tiny-zh", "mix"): 10.0,
}
# The `mix` request: 1-32 texts, each drawn from these pools with these weights.
MIX_POOLS = (("sts-b-zh sentence", 0.6), ("sohu passage", 0.3), ("sohu news document", 0.1))
MODEL_NAME = "bge"
FAILURE_KINDS = ("429", "503", "504", "other_status", "timeout", "connection_error")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================ pure ladder and summary
def sustains(step: dict, slo_ms: float) -> bool:
    """A step is sustained when every request was answered 200 and the p99 of those is within the SLO."""
    p99 = step.get("p99_ms")
    return step["failures_total"] == 0 and step["answered"] > 0 and p99 is not None and p99 <= slo_ms


def next_rate(history: Sequence[tuple[float, bool]], start: float, floor: float, ceiling: float,
              factor: float = 2.0, max_ratio: float = 1.25) -> float | None:
    """The next offered rate of the adaptive ladder, or None when done.

    ``history`` is (rate, sustained) in the order run. Climb by ``factor`` while sustained; after the first
    failure, climb from the best sustained rate towards the lowest failed rate above it in equal geometric
    steps of at most ``max_ratio``; finally run once at 2x the max sustainable rate. If the first rate
    fails, divide by ``factor`` down to ``floor``."""
    if not history:
        return start
    tried = [r for r, _ in history]
    good = [r for r, ok in history if ok]
    if not good:
        lower = min(tried) / factor
        return lower if lower >= floor * (1 - 1e-9) else None
    best = max(good)
    above = [r for r, ok in history if not ok and r > best]
    if not above:  # still climbing; the last step lands on the ceiling itself
        return min(best * factor, ceiling) if best < ceiling * (1 - 1e-9) else None
    bad = min(above)
    if bad / best > max_ratio * (1 + 1e-9):
        steps = math.ceil(math.log(bad / best) / math.log(max_ratio) - 1e-9)
        return round(best * (bad / best) ** (1 / steps), 2)
    double = 2 * best
    if any(math.isclose(r, double, rel_tol=0.02) for r in tried):
        return None
    return double


SHED_ALLOWANCE = 0.005  # the secondary figure: a server that sheds up to 0.5% with 429 to hold its SLO


def within_slo(step: dict, slo_ms: float) -> bool:
    """p99 <= SLO, no error but 429, and at most SHED_ALLOWANCE of the requests refused with 429. A server
    with admission control refuses a trickle near its capacity by design; "sustains" counts that as failing."""
    p99 = step.get("p99_ms")
    fails = step["failures"]
    others = step["failures_total"] - fails["429"]
    return (step["answered"] > 0 and p99 is not None and p99 <= slo_ms and others == 0
            and fails["429"] <= SHED_ALLOWANCE * max(step["requests"], 1))


def summarise(steps: Sequence[dict], slo_ms: float) -> dict:
    """Max sustainable rate (highest offered rate with p99 <= SLO and no failures), what happened at 2x, and
    the highest rate held within the SLO while shedding at most SHED_ALLOWANCE."""
    within = [s["offered_rps"] for s in steps if within_slo(s, slo_ms)]
    max_within = max(within) if within else None
    good = [s for s in steps if sustains(s, slo_ms)]
    if not good:
        return {"max_sustainable_rps": None, "max_is_lower_bound": False, "at_2x": None,
                "max_within_slo_rps": max_within}
    best = max(s["offered_rps"] for s in good)
    lower_bound = not any(s["offered_rps"] > best and not sustains(s, slo_ms) for s in steps)
    over = [s for s in steps if math.isclose(s["offered_rps"], 2 * best, rel_tol=0.02)]
    at_2x = None
    if over:
        s = over[-1]
        sent = max(s["requests"], 1)
        fail = s["failures"]
        at_2x = {
            "offered_rps": s["offered_rps"],
            "goodput_rps": s["goodput_rps"],
            "goodput_vs_max": s["goodput_rps"] / best,
            "p99_ms": s["p99_ms"],
            "refused_429_fraction": fail["429"] / sent,
            "errors_5xx": fail["503"] + fail["504"] + s["other_5xx"],
            "timeouts": fail["timeout"],
            "connection_errors": fail["connection_error"],
        }
    return {"max_sustainable_rps": best, "max_is_lower_bound": lower_bound, "at_2x": at_2x,
            "max_within_slo_rps": max_within}


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return 1000 * float(np.percentile(values, q)) if len(values) else None


# ============================================================================ request mixes
@dataclass
class Workload:
    """Text pools and how one request of a mix is drawn; seeded per rate so every server sees the same load."""

    queries: list[str]
    pools: list[list[str]]
    weights: np.ndarray
    instruction: str

    @classmethod
    def load(cls, instruction: str) -> "Workload":
        sts = datasets.sts_b_zh()
        pools = [sts.first + sts.second, datasets.sohu_passages(), datasets.sohu_long_documents()]
        weights = np.array([w for _, w in MIX_POOLS])
        return cls(datasets.zh_queries(), pools, weights / weights.sum(), instruction)

    def request(self, mix: str, rng: np.random.Generator) -> tuple[list[str], bool]:
        """(texts, is_query) of one request."""
        if mix == "query":
            return [self.queries[int(rng.integers(len(self.queries)))]], True
        n = int(rng.integers(1, 33))
        picks = rng.choice(len(self.pools), size=n, p=self.weights)
        return [self.pools[k][int(rng.integers(len(self.pools[k])))] for k in picks], False


def body(texts: list[str], query: bool, client_prefix: str | None) -> bytes:
    """OpenAI-shaped request body; servers without ``input_type`` get the instruction from the client."""
    import orjson

    if client_prefix is not None:
        return orjson.dumps({"model": MODEL_NAME, "input": [client_prefix + t for t in texts] if query else texts})
    return orjson.dumps({"model": MODEL_NAME, "input": texts, "input_type": "query" if query else "document"})


def rate_rng(seed: int, stream: int, rate: float) -> np.random.Generator:
    """Seeded by (seed, stream, rate): the same rate gives every server the same arrivals and texts."""
    return np.random.default_rng([seed, stream, int(round(rate * 1000))])


def schedule(rate: float, n: int, seed: int) -> np.ndarray:
    """Poisson arrival offsets (s) of n requests at ``rate`` req/s."""
    return np.cumsum(rate_rng(seed, 1, rate).exponential(1.0 / rate, size=n))


def draw_requests(work: Workload, mix: str, n: int, rng: np.random.Generator) -> list[tuple[list[str], bool]]:
    return [work.request(mix, rng) for _ in range(n)]


# ============================================================================ servers
class Unavailable(Exception):
    """A server that could not be prepared or started; reported in the results with the reason."""


@dataclass
class ServerSpec:
    name: str
    command: Callable[[int], tuple[list[str], dict[str, str], Path]]  # port -> argv, env, cwd
    client_prefix: str | None = None  # instruction the client prepends to queries (no input_type support)
    note: str = ""
    label: str = ""  # default: LABELS[name]


def base_env(threads: int) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def naive_spec(name: str, files: dict[str, Path], threads: int, device: str = "cpu") -> ServerSpec:
    backend = name.removeprefix("naive-")
    if device == "cuda" and backend not in ("st-torch", "ours"):
        raise Unavailable(f"{name} has no CUDA form (naive-st-torch and naive-ours do: fp16)")
    model = {"st-torch": files["checkpoint"], "st-qint8": files.get("st-onnx-int8"), "ours": files["artifact"]}[backend]
    if model is None:
        raise Unavailable(f"{name} needs the ST qint8 recipe graph, which only the benchmark's own cache builds "
                          "(run without --artifact)")
    extra = ["--tokenizer", str(files["artifact"] / "tokenizer.json")] if backend == "st-qint8" else []
    extra += ["--device", "cuda"] if device == "cuda" else []

    def command(port: int) -> tuple[list[str], dict[str, str], Path]:
        argv = [sys.executable, "-m", "benchmarks.naive_server", "--backend", backend, "--model", str(model),
                "--port", str(port), "--threads", str(threads), *extra]
        return argv, base_env(threads), ROOT

    note = "optimum's plain export + avx512_vnni dynamic preset, rebuilt via onnxruntime; our tokenisation" \
        if backend == "st-qint8" else ""
    if device == "cuda":
        note = "on the GPU in fp16 (sentence-transformers .half(); ours: the fp16 variant, CUDA provider)"
    return ServerSpec(name, command, note=note, label=label(name, device))


def ours_layout(layout: str | None, threads: int) -> tuple[int, int]:
    """(workers, intra-op threads each) runtime.serve runs: ``KxT`` as given, else its default for ``threads``
    cores (one worker per core, one thread each; runtime/serve/config.py)."""
    if layout:
        k, _, t = layout.partition("x")
        return int(k), int(t)
    return threads, 1


def admission_args(args: argparse.Namespace, slo_ms: float) -> list[str]:
    """How ours is told the SLO: ``--latency-target`` (the budget measured against it; what an operator with
    a latency SLO passes), or the fixed ``--max-queue-time`` when the benchmark is given one."""
    if args.max_queue_time is not None:
        return ["--max-queue-time", f"{args.max_queue_time:g}"]
    return ["--latency-target", f"{slo_ms / 1000:g}"]


def ours_spec(files: dict[str, Path], threads: int, admission: list[str], cache_size: int,
              layout: tuple[int, int] | None, device: str = "cpu") -> ServerSpec:
    """runtime.serve on ``threads`` cores as ``layout`` (workers, threads each; None: the server's own default,
    what a CUDA run uses); its exact-match vector cache is off by default (--ours-cache-size), because the
    ladder repeats texts from finite pools and no other server caches: hits would measure the cache."""
    if importlib.util.find_spec("runtime.serve") is None:
        raise Unavailable("runtime.serve does not exist yet (no module runtime/serve)")
    shape = [] if layout is None else ["--workers", str(layout[0]), "--threads", str(layout[1])]
    on_device = ["--device", "cuda", "--precision", "fp16"] if device == "cuda" else []

    def command(port: int) -> tuple[list[str], dict[str, str], Path]:
        argv = [sys.executable, "-m", "runtime.serve", "--model", f"{MODEL_NAME}={files['artifact']}",
                "--host", "127.0.0.1", "--port", str(port), *shape, *on_device, *admission,
                "--cache-size", str(cache_size)]
        return argv, base_env(threads), ROOT

    where = "its default layout" if layout is None else f"{layout[0]} workers x {layout[1]} thread(s)"
    return ServerSpec("ours", command, note=f"{where}, {' '.join(admission)} --cache-size {cache_size}",
                      label=label("ours", device))


def infinity_spec(files: dict[str, Path], threads: int, arch: str, instruction: str) -> ServerSpec:
    """infinity-emb via benchmarks.infinity_peer; any failure to build its venv or model is Unavailable."""
    try:
        peer = importlib.import_module("benchmarks.infinity_peer")
    except ImportError as exc:
        raise Unavailable(f"benchmarks.infinity_peer cannot be imported: {exc}") from exc
    try:
        say("[infinity] ensuring its venv and model (cached) ...")
        peer.ensure_env(CACHE / "infinity-venv")
        model_dir = peer.prepare_model(files["checkpoint"], CACHE / arch / "infinity")
    except Exception as exc:  # noqa: BLE001 - any failure of the peer's setup is reported, not fatal
        raise Unavailable(f"infinity_peer setup failed: {type(exc).__name__}: {exc}") from exc

    def command(port: int) -> tuple[list[str], dict[str, str], Path]:
        argv, env, cwd = peer.server_command(model_dir, port, threads)
        return list(argv), dict(env), Path(cwd)

    return ServerSpec("infinity", command, client_prefix=instruction,
                      note="no input_type: the client prepends the query instruction")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A started server: its process tree's CPU time and memory, and a clean stop."""

    spec: ServerSpec
    proc: subprocess.Popen
    port: int
    log: Path
    rss_samples: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, spec: ServerSpec, log: Path) -> "ServerProcess":
        port = free_port()
        argv, env, cwd = spec.command(port)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        return cls(spec, proc, port, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return total

    def sample_rss(self) -> None:
        import psutil

        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        self.rss_samples.append(total / 2**20)

    def vmhwm_mb(self) -> float:
        """Sum of each live process's own peak RSS (VmHWM): an upper bound of the tree's peak."""
        total = 0.0
        for p in self.tree():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                continue
        return total

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the server, then SIGKILL whatever of its tree is left after ``grace_s``."""
        import psutil

        tree = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for p in tree[1:]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue
        return self.proc.returncode


# ============================================================================ open-loop client
@dataclass
class Outcome:
    latency_s: float
    status: int | None  # None: timeout or connection error
    error: str | None = None


async def send(session, url: str, payload: bytes, scheduled: float, timeout_s: float) -> Outcome:
    """One request; latency from its scheduled send time, timeout counted from it too."""
    import aiohttp

    loop = asyncio.get_running_loop()
    remaining = max(scheduled + timeout_s - loop.time(), 0.001)
    try:
        async with session.post(url, data=payload, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=remaining)) as resp:
            await resp.read()
            return Outcome(loop.time() - scheduled, resp.status)
    except asyncio.TimeoutError:
        return Outcome(loop.time() - scheduled, None, "timeout")
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome(loop.time() - scheduled, None, f"connection_error:{type(exc).__name__}")


async def open_loop(session, url: str, payloads: list[bytes], offsets: np.ndarray,
                    timeout_s: float) -> tuple[list[Outcome], list[float]]:
    """Send each payload at its offset whatever the earlier answers do; returns outcomes and send lags."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks, lags = [], []
    for payload, offset in zip(payloads, offsets):
        scheduled = t0 + float(offset)
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(loop.time() - scheduled)
        tasks.append(asyncio.create_task(send(session, url, payload, scheduled, timeout_s)))
    return list(await asyncio.gather(*tasks)), lags


def step_stats(rate: float, window_s: float, outcomes: list[Outcome], lags: list[float], texts: int,
               slo_ms: float) -> dict:
    """Per-step figures: goodput, latency percentiles of 200s, failures by kind."""
    ok = [o.latency_s for o in outcomes if o.status == 200]
    failures = dict.fromkeys(FAILURE_KINDS, 0)
    statuses: dict[str, int] = {}
    other_5xx = 0
    for o in outcomes:
        if o.status == 200:
            continue
        if o.status is None:
            failures["timeout" if o.error == "timeout" else "connection_error"] += 1
            continue
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        if str(o.status) in failures:
            failures[str(o.status)] += 1
        else:
            failures["other_status"] += 1
            other_5xx += o.status >= 500
    good = sum(1 for x in ok if x * 1000 <= slo_ms)
    return {
        "offered_rps": rate,
        "requests": len(outcomes),
        "texts": texts,
        "window_s": window_s,
        "answered": len(ok),
        "goodput_rps": good / window_s,
        "p50_ms": percentile_ms(ok, 50),
        "p90_ms": percentile_ms(ok, 90),
        "p99_ms": percentile_ms(ok, 99),
        "max_ms": percentile_ms(ok, 100),
        "failures": failures,
        "failures_total": sum(failures.values()),
        "other_5xx": other_5xx,
        "non_200_statuses": statuses,
        "send_lag_p99_ms": percentile_ms(lags, 99),
    }


# ============================================================================ one server
@dataclass
class Config:
    arch: str
    mix: str
    slo_ms: float
    threads: int
    duration_s: float
    min_requests: int
    rates: list[float] | None
    start_rps: float
    max_rps: float
    max_steps: int
    warmup: int
    drain_s: float
    drain_max_s: float
    timeout_s: float
    connections: int
    ready_timeout_s: float
    seed: int


async def wait_ready(server: ServerProcess, session, timeout_s: float, probe: bytes) -> float:
    """Poll GET /health (or, where it is missing, the route with a tiny request) until 200; seconds taken."""
    import aiohttp

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if server.proc.poll() is not None:
            raise Unavailable(f"exited with code {server.proc.returncode} before ready: {server.log_tail()}")
        try:
            async with session.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return time.monotonic() - start
                if r.status == 404:
                    async with session.post(server.url + "/v1/embeddings", data=probe,
                                            headers={"Content-Type": "application/json"},
                                            timeout=aiohttp.ClientTimeout(total=10)) as r2:
                        if r2.status == 200:
                            return time.monotonic() - start
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.25)
    raise Unavailable(f"not ready within {timeout_s:.0f}s: {server.log_tail()}")


def decode_vectors(answer: dict) -> np.ndarray:
    rows = sorted(answer["data"], key=lambda d: d.get("index", 0))
    vecs = []
    for r in rows:
        e = r["embedding"]
        vecs.append(np.frombuffer(base64.b64decode(e), np.float32) if isinstance(e, str) else np.asarray(e, np.float32))
    v = np.stack(vecs).astype(np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


async def check_vectors(server: ServerProcess, session, reference: dict) -> dict:
    """Cosine of the server's vectors to runtime.Embedder's (fp32 and int8) on the same checkpoint."""
    import aiohttp

    out: dict[str, float] = {}
    for kind, texts in (("document", reference["documents"]), ("query", reference["queries"])):
        payload = body(texts, kind == "query", server.spec.client_prefix)
        try:
            async with session.post(server.url + "/v1/embeddings", data=payload,
                                    headers={"Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                raw = await r.read()
                status = r.status
            if status != 200:
                raise Unavailable(f"vector check: {kind} request returned {status}: {raw[:300]!r}")
            got = decode_vectors(json.loads(raw))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
            raise Unavailable(f"vector check: {kind} request failed: {type(exc).__name__}: {exc}") from exc
        if got.shape != reference[f"{kind}_fp32"].shape:
            raise Unavailable(f"vector check: {kind} answer has shape {got.shape}, "
                              f"expected {reference[f'{kind}_fp32'].shape}")
        for precision in reference["precisions"]:
            ref = reference[f"{kind}_{precision}"]
            out[f"{kind}_min_cos_vs_ours_{precision}"] = float((got * ref).sum(1).min())
    return out


async def drain(server: ServerProcess, min_s: float, max_s: float, idle_cores: float = 0.1) -> float:
    """Wait at least ``min_s``, then until the server tree is idle (it may still work off a queue)."""
    start = time.monotonic()
    await asyncio.sleep(min_s)
    while time.monotonic() - start < max_s:
        c0, t0 = server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(0.5)
        if (server.cpu_seconds() - c0) / (time.monotonic() - t0) < idle_cores:
            break
    return time.monotonic() - start


async def admission_state(server: ServerProcess, session) -> dict | None:
    """Ours only: what admission reports in /info (requests let in on the latency target's tail, the queue
    budget), summed over its models; None for the other servers, which have no such route."""
    import aiohttp

    if server.spec.name != "ours":
        return None
    async with session.get(server.url + "/info", timeout=aiohttp.ClientTimeout(total=5)) as r:
        models = (await r.json())["models"]
    return {"tail_admitted": sum(m.get("tail_admitted_requests", 0) for m in models),
            "lone_runs": sum(m.get("lone_runs", 0) for m in models),
            "queue_budget_s": [m.get("queue_budget_seconds") for m in models]}


async def run_step(server: ServerProcess, session, work: Workload, cfg: Config, rate: float) -> dict:
    n = max(int(round(rate * cfg.duration_s)), cfg.min_requests)
    offsets = schedule(rate, n, cfg.seed)
    reqs = draw_requests(work, cfg.mix, n, rate_rng(cfg.seed, 2, rate))
    payloads = [body(t, q, server.spec.client_prefix) for t, q in reqs]
    admission0 = await admission_state(server, session)
    cpu_server0, cpu_client0, wall0 = server.cpu_seconds(), time.process_time(), time.monotonic()
    outcomes, lags = await open_loop(session, server.url + "/v1/embeddings", payloads, offsets, cfg.timeout_s)
    wall = time.monotonic() - wall0
    # goodput over the nominal window n / rate, so a sustained step's goodput equals its offered rate
    stats = step_stats(rate, n / rate, outcomes, lags, sum(len(t) for t, _ in reqs), cfg.slo_ms)
    stats["client_cpu_share"] = (time.process_time() - cpu_client0) / wall
    stats["server_cpu_share"] = (server.cpu_seconds() - cpu_server0) / wall
    stats["wall_s"] = wall
    stats["sustained"] = sustains(stats, cfg.slo_ms)
    admission = await admission_state(server, session)
    if admission is not None and admission0 is not None:
        stats["tail_admitted"] = admission["tail_admitted"] - admission0["tail_admitted"]
        stats["lone_runs"] = admission["lone_runs"] - admission0["lone_runs"]
        stats["queue_budget_s"] = admission["queue_budget_s"]
    server.sample_rss()
    return stats


def step_line(name: str, s: dict) -> str:
    p99 = f"{s['p99_ms']:.1f}" if s["p99_ms"] is not None else "-"
    fails = ", ".join(f"{k} {v}" for k, v in s["failures"].items() if v) or "none"
    return (f"[{name}] {s['offered_rps']:g} req/s: goodput {s['goodput_rps']:.1f}/s, p99 {p99} ms, "
            f"failures {fails}, client CPU {s['client_cpu_share']:.2f}, server CPU {s['server_cpu_share']:.2f}"
            + (f", over budget on the tail {s['tail_admitted']}" if "tail_admitted" in s else "")
            + (f", lone lane runs {s['lone_runs']}" if s.get("lone_runs") else "")
            + f" -> {'ok' if s['sustained'] else 'FAIL'}")


async def ladder(server: ServerProcess, session, work: Workload, cfg: Config) -> list[dict]:
    """Explicit rates, or the adaptive ladder of ``next_rate``; stops early if the server exits."""
    steps: list[dict] = []
    history: list[tuple[float, bool]] = []
    planned = list(cfg.rates) if cfg.rates else None
    while len(steps) < cfg.max_steps:
        if planned is not None:
            if not planned:
                break
            rate = planned.pop(0)
        else:
            rate = next_rate(history, cfg.start_rps, cfg.start_rps / 8, cfg.max_rps)
            if rate is None:
                break
        s = await run_step(server, session, work, cfg, rate)
        say(step_line(server.spec.name, s))
        s["drain_s"] = await drain(server, cfg.drain_s, cfg.drain_max_s)
        steps.append(s)
        history.append((rate, s["sustained"]))
        if server.proc.poll() is not None:
            s["server_exited"] = server.proc.returncode
            say(f"[{server.spec.name}] exited with code {server.proc.returncode} during the ladder")
            break
    return steps


async def sample_rss_forever(server: ServerProcess, every_s: float = 1.0) -> None:
    while True:
        server.sample_rss()
        await asyncio.sleep(every_s)


async def bench_server(spec: ServerSpec, work: Workload, cfg: Config, reference: dict, log: Path) -> dict:
    """Start, wait for readiness, check vectors, warm up, run the ladder, stop; the server's result row."""
    import aiohttp

    row: dict = {"server": spec.name, "label": spec.label or LABELS[spec.name], "note": spec.note}
    say(f"[{spec.name}] starting (log {log}) ...")
    try:
        server = ServerProcess.start(spec, log)
    except (OSError, ValueError, TypeError) as exc:
        row["unavailable"] = f"could not start: {type(exc).__name__}: {exc}"
        return row
    sampler = None
    connector = aiohttp.TCPConnector(limit=cfg.connections, keepalive_timeout=60)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            probe = body(["你好"], False, spec.client_prefix)
            row["ready_s"] = await wait_ready(server, session, cfg.ready_timeout_s, probe)
            sampler = asyncio.create_task(sample_rss_forever(server))
            row["vectors"] = await check_vectors(server, session, reference)
            warm = draw_requests(work, cfg.mix, cfg.warmup, rate_rng(cfg.seed, 3, 0.0))
            for texts, query in warm:
                await send(session, server.url + "/v1/embeddings", body(texts, query, spec.client_prefix),
                           asyncio.get_running_loop().time(), cfg.timeout_s)
            row["steps"] = await ladder(server, session, work, cfg)
    except Unavailable as exc:
        row["unavailable"] = str(exc)
        say(f"[{spec.name}] unavailable: {exc}")
    finally:
        if sampler is not None:
            sampler.cancel()
        row["peak_rss_mb_sampled"] = max(server.rss_samples, default=None)
        row["peak_rss_mb"] = server.vmhwm_mb() or None
        row["exit_code"] = server.stop()
    if "steps" in row:
        row["summary"] = summarise(row["steps"], cfg.slo_ms)
    return row


# ============================================================================ setup and reference
def prepare_files(arch: str) -> dict[str, Path]:
    """Checkpoint, our artifact (fp32+int8) and the ST qint8 recipe graph: speed.py's cache, reused (the
    artifact is rebuilt when the export code changed)."""
    from .speed import prepare

    return prepare(arch)


def reference_vectors(artifact: Path, threads: int) -> dict:
    """runtime.Embedder vectors (CPU provider) of 8 fixed documents and 4 queries, fp32 and (where the artifact
    has it) int8, to check each server."""
    import warnings

    from runtime import Embedder, Manifest

    sts = datasets.sts_b_zh()
    documents = sts.first[:6] + datasets.sohu_passages()[:1] + datasets.sohu_long_documents()[:1]
    queries = datasets.zh_queries()[:4]
    ref: dict = {"documents": documents, "queries": queries}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long document is truncated, as by every server
        ref["precisions"] = [p for p in ("fp32", "int8") if p in Manifest.load(artifact).variants]
        for precision in ref["precisions"]:
            emb = Embedder(artifact, device="cpu", precision=precision, threads=threads)
            ref[f"document_{precision}"] = emb.embed(documents).astype(np.float64)
            ref[f"query_{precision}"] = emb.embed_queries(queries).astype(np.float64)
            ref["instruction"] = emb.manifest.query_instruction
            del emb
    return ref


def label(name: str, device: str) -> str:
    return CUDA_LABELS.get(name, LABELS[name]) if device == "cuda" else LABELS[name]


def build_spec(name: str, files: dict[str, Path], args: argparse.Namespace, admission: list[str],
               instruction: str) -> ServerSpec:
    if name in NAIVE:
        return naive_spec(name, files, args.threads, args.device)
    if name == "ours":
        layout = None if args.device == "cuda" and not args.ours_layout else ours_layout(args.ours_layout, args.threads)
        return ours_spec(files, args.threads, admission, args.ours_cache_size, layout, args.device)
    if args.device == "cuda":
        raise Unavailable(f"{name} is not run on CUDA by this benchmark")
    if name == "infinity":
        return infinity_spec(files, args.threads, args.model_arch, instruction)
    raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


# ============================================================================ machine facts
def machine() -> dict:
    flags = cpu_flag_set()
    import onnxruntime

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": {f: f in flags for f in SPEED_FLAGS},
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {m: package_version(m)
                     for m in ("fastapi", "uvicorn", "aiohttp", "sentence-transformers", "torch")},
    }


def gpu_name() -> str | None:
    """The card the CUDA run used, from nvidia-smi (the benchmark process itself does not import torch)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ============================================================================ report
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(result: dict) -> list[str]:
    rows = result["servers"]
    naive = [r for r in rows if r["server"] in NAIVE and (r.get("summary") or {}).get("max_sustainable_rps")]
    head = ["server", "max sustainable (req/s)", *[f"vs {r['server']}" for r in naive],
            f"max within SLO, <= {100 * SHED_ALLOWANCE:g}% shed (req/s)",
            "at 2x: offered", "goodput (/s)", "p99 (ms)", "429 %", "5xx", "timeouts", "conn err", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if "summary" not in r:
            lines.append(f"| {r['server']} | unavailable: {r.get('unavailable', '?')[:160].replace('|', '/')} |")
            continue
        s = summarise(r["steps"], result["slo_ms"])  # recomputed: entries of older runs lack newer figures
        best = s["max_sustainable_rps"]
        cells = [r["server"], "none" if best is None else f"{'>=' if s['max_is_lower_bound'] else ''}{best:g}"]
        for n in naive:
            nb = n["summary"]["max_sustainable_rps"]
            cells.append("-" if best is None else f"{best / nb:.2f}x")
        cells.append("none" if s["max_within_slo_rps"] is None else f"{s['max_within_slo_rps']:g}")
        a = s["at_2x"]
        if a is None:
            cells += ["-"] * 7
        else:
            cells += [f"{a['offered_rps']:g}", fmt(a["goodput_rps"]), fmt(a["p99_ms"]),
                      f"{100 * a['refused_429_fraction']:.0f}", str(a["errors_5xx"]), str(a["timeouts"]),
                      str(a["connection_errors"])]
        cells.append(fmt(r.get("peak_rss_mb"), ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def steps_table(steps: list[dict]) -> list[str]:
    lines = ["| offered (req/s) | sent | goodput (/s) | p50 (ms) | p90 (ms) | p99 (ms) | 200 | 429 | 503 | 504 | "
             "other | timeout | conn err | client CPU | server CPU | send lag p99 (ms) | sustained |",
             "|" + "---:|" * 16 + "---|"]
    for s in steps:
        f = s["failures"]
        lines.append(
            f"| {s['offered_rps']:g} | {s['requests']} | {s['goodput_rps']:.1f} | {fmt(s['p50_ms'])} | "
            f"{fmt(s['p90_ms'])} | {fmt(s['p99_ms'])} | {s['answered']} | {f['429']} | {f['503']} | {f['504']} | "
            f"{f['other_status']} | {f['timeout']} | {f['connection_error']} | {s['client_cpu_share']:.2f} | "
            f"{s['server_cpu_share']:.2f} | {fmt(s['send_lag_p99_ms'])} | {'yes' if s['sustained'] else 'no'} |")
    return lines


def report(result: dict) -> str:
    m = result["machine"]
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v) or "none"
    lines = [
        f"# Serving benchmark: {result['arch']} (random weights), `{result['mix']}` mix",
        "",
        f"Open loop (Poisson arrivals, seed {result['seed']}; latency from the scheduled send time), "
        f"SLO p99 <= {result['slo_ms']:g} ms, {result['threads']} intra-op threads per server, client timeout "
        f"{result['timeout_s']:g} s, {result['duration_s']:g} s per step (>= {result['min_requests']} requests). "
        + (f"GPU: {result['gpu']} (servers on CUDA, fp16). " if result.get("device") == "cuda" else "")
        + f"{m['cpu']} ({m['cores']} cores; {flags}), onnxruntime {m['onnxruntime']}, commit "
        f"{m['git_commit'][:10]}{' (dirty)' if m['git_dirty'] else ''}, {m['date']}.",
        f"Mix: {result['mix_description']}",
        "",
        *(["Rerun later, side by side with each other only: "
           + "; ".join(f"{r['server']} ({r['date']}, commit {r['git_commit'][:10]})" for r in result["reruns"])
           + ". The other servers' figures are from the run above.", ""] if result.get("reruns") else []),
        "Max sustainable rate = highest offered rate with p99 <= SLO and no failures (>= : never failed up to "
        "the ladder's ceiling). The 2x columns are the step at twice that rate. `naive-st-qint8` is "
        "sentence-transformers' qint8 ONNX recipe (optimum's plain export + avx512_vnni dynamic preset, rebuilt "
        "via onnxruntime) run through this project's tokenisation. Client and servers share the cores.",
        "",
        *summary_table(result),
        *model_alone_lines(result),
        "",
        "## Vector check (min cosine to runtime.Embedder on the same checkpoint)",
        "",
        "| server | documents vs fp32 | documents vs int8 | queries vs fp32 | queries vs int8 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["servers"]:
        v = r.get("vectors")
        if v:
            cells = [fmt(v.get(f"{kind}_min_cos_vs_ours_{p}"), ".5f") for kind in ("document", "query")
                     for p in ("fp32", "int8")]
            lines.append(f"| {r['server']} | " + " | ".join(cells) + " |")
    for r in result["servers"]:
        lines += ["", f"## {r['server']}: {r['label']}", ""]
        if r.get("note"):
            lines += [f"Note: {r['note']}.", ""]
        if "unavailable" in r:
            lines.append(f"Unavailable: {r['unavailable']}")
            continue
        lines += [f"Ready after {r['ready_s']:.1f} s; peak RSS {fmt(r.get('peak_rss_mb'), '.0f')} MB "
                  f"(sum of VmHWM over the tree; sampled {fmt(r.get('peak_rss_mb_sampled'), '.0f')} MB).", ""]
        lines += steps_table(r["steps"])
        lines += late_client_notes(r["steps"], result["slo_ms"])
    return "\n".join(lines)


def model_alone_lines(result: dict) -> list[str]:
    """The model alone with ours' worker layout, and ours' max sustainable rate as a share of it: on the mix's
    own queries (drawn, padded per run) and, as measured before those figures existed, at their median length."""
    alone = result.get("model_alone")
    if not alone:
        return []
    ours = next((r for r in result["servers"] if r["server"] == "ours" and "summary" in r), None)
    rate = ours["summary"].get("max_sustainable_rps") if ours is not None else None
    lines = [""]
    if "drawn_rows" in alone:
        per = ", ".join(f"{r['texts']} per run {r['texts_per_s']:.0f}" for r in alone["drawn_rows"])
        line = (f"Model alone in this run ({alone['workers']} workers x {alone['threads']} thread(s)) on this mix's "
                f"queries ({alone['mean_tokens_per_text']:.1f} tokens on average, drawn at random, each run padded "
                f"to its longest), texts/s: {per}; mean {alone['drawn_mean_texts_per_s']:.0f}.")
        if rate:
            line += f" Ours sustains {rate / alone['drawn_mean_texts_per_s']:.0%} of that."
        lines += [line, ""]
    per = ", ".join(f"{r['texts']} per run {r['texts_per_s']:.0f}" for r in alone["rows"])
    line = (f"Model alone at the median length ({alone['workers']} workers x {alone['threads']} thread(s), "
            f"{alone['tokens_per_text']}-token texts, texts/s): {per}; mean {alone['mean_texts_per_s']:.0f}.")
    if rate:
        line += f" Ours sustains {rate / alone['mean_texts_per_s']:.0%} of that."
    return lines + [line]


def late_client_notes(steps: list[dict], slo_ms: float) -> list[str]:
    """Warn where the client itself sent late (it shares the cores): those latencies are partly the client's."""
    notes = []
    late = [s["offered_rps"] for s in steps if (s["send_lag_p99_ms"] or 0) > 0.1 * slo_ms]
    if late:
        notes += ["", f"Client sent late (send lag p99 > 10% of the SLO) at {', '.join(f'{r:g}' for r in late)} "
                  "req/s: latency there includes the client's own delay."]
    exited = [s for s in steps if "server_exited" in s]
    if exited:
        notes += ["", f"The server exited (code {exited[0]['server_exited']}) during the step at "
                  f"{exited[0]['offered_rps']:g} req/s."]
    return notes


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in result["servers"]:
        steps = sorted((s for s in r.get("steps", []) if s["p99_ms"] is not None), key=lambda s: s["offered_rps"])
        if not steps:
            continue
        x = [s["offered_rps"] for s in steps]
        (line,) = ax.plot(x, [s["p99_ms"] for s in steps], marker="o", label=r["server"])
        bad = [s for s in steps if s["failures_total"]]
        ax.scatter([s["offered_rps"] for s in bad], [s["p99_ms"] for s in bad], marker="x", s=80,
                   color=line.get_color(), zorder=3)
    ax.axhline(result["slo_ms"], color="grey", linestyle="--", label=f"SLO {result['slo_ms']:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("p99 latency of answered requests (ms)")
    ax.set_title(f"{result['arch']} ({result['mix']} mix), {result['threads']} threads; x = step with failures",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_stem(arch: str, mix: str, device: str) -> str:
    """CPU runs keep their historical names; a CUDA run never overwrites them."""
    return f"serve-{arch}-{mix}" + ("-cuda" if device == "cuda" else "")


def write_outputs(result: dict, out: Path) -> None:
    stem = result_stem(result["arch"], result["mix"], result.get("device", "cpu"))
    md = report(result)
    save(out, stem, result, md)
    chart(result, out / f"{stem}.png")


# ============================================================================ main
def mix_description(mix: str) -> str:
    if mix == "query":
        return "one query per request (zh_queries, BGE retrieval instruction, input_type query)."
    pools = ", ".join(f"{name} {int(w * 100)}%" for name, w in MIX_POOLS)
    return f"1-32 texts per request (uniform), each drawn from {pools} (input_type document)."


async def run_mix(mix: str, names: list[str], files: dict[str, Path], args: argparse.Namespace,
                  work: Workload, reference: dict) -> dict:
    """Every server in turn on one request mix; results written after each server."""
    cfg = config(args, mix)
    admission = admission_args(args, cfg.slo_ms)
    result = {
        "arch": cfg.arch, "mix": mix, "mix_description": mix_description(mix), "slo_ms": cfg.slo_ms,
        "threads": cfg.threads, "duration_s": cfg.duration_s, "min_requests": cfg.min_requests,
        "timeout_s": cfg.timeout_s, "seed": cfg.seed, "ours_admission": " ".join(admission),
        "ours_cache_size": args.ours_cache_size,
        "connections": cfg.connections, "rates": cfg.rates, "start_rps": cfg.start_rps,
        "device": args.device, "gpu": gpu_name() if args.device == "cuda" else None,
        "machine": machine(), "servers": [],
    }
    previous = args.out / f"{result_stem(cfg.arch, mix, args.device)}.json"
    if args.rerun and previous.is_file():
        # replace only the named servers in the last run's results; each entry says when it was measured
        result = json.loads(previous.read_text())
        result.setdefault("reruns", [])
    if mix == "query" and "ours" in names and args.device == "cpu" and "int8" in reference["precisions"]:
        # what the model alone does with ours' worker layout on this mix's texts, in this run: the ceiling
        # the server is measured against (its max sustainable rate / this, at 1-4 texts per run)
        result["model_alone"] = model_alone_figures(files["artifact"], ours_layout(args.ours_layout, args.threads),
                                                    work, quick=args.quick)
        result["model_alone"]["measured"] = machine()["date"]
        say(f"model alone: {result['model_alone']}")
    for name in names:
        try:
            spec = build_spec(name, files, args, admission, reference["instruction"])
        except Unavailable as exc:
            entry = {"server": name, "label": label(name, args.device), "unavailable": str(exc)}
        else:
            log = CACHE / "serve-logs" / f"{cfg.arch}-{mix}-{name}.log"
            entry = await bench_server(spec, work, cfg, reference, log)
        stamp = machine()
        entry["measured"] = {"date": stamp["date"], "git_commit": stamp["git_commit"], "git_dirty": stamp["git_dirty"]}
        servers = result["servers"]
        at = next((i for i, e in enumerate(servers) if e["server"] == name), None)
        if at is None:
            servers.append(entry)
        else:
            servers[at] = entry
        if "reruns" in result:
            result["reruns"].append({"server": name, **entry["measured"]})
        write_outputs(result, args.out)  # partial results survive an interrupted run
    return result


def model_alone_figures(artifact: Path, layout: tuple[int, int], work: Workload, quick: bool) -> dict:
    """Texts/s of ``InferenceSession.run`` in a loop from ``workers`` threads at 1, 2 and 4 texts per run: at the
    median token length of this mix's queries (instruction included; ``rows``), and on the queries themselves,
    drawn at random and padded to each run's longest (``drawn_rows``: the work the server is sent, so the
    share of it the server sustains compares like with like)."""
    from runtime import Embedder

    from .layout import model_alone

    workers, threads = layout
    emb = Embedder(artifact, device="cpu", precision="int8")
    encoded = emb.tokenize([work.instruction + q for q in work.queries])
    length = int(np.median(encoded.lengths))
    model = artifact / emb.manifest.variants["int8"].model_file
    pad_id = emb.manifest.pad_token_id
    del emb
    seconds = 1.0 if quick else 5.0
    rows = [model_alone(model, workers, threads, False, n, seconds, length) for n in (1, 2, 4)]
    drawn = [model_alone(model, workers, threads, False, n, seconds, rows=encoded.ids, pad_id=pad_id)
             for n in (1, 2, 4)]
    return {"workers": workers, "threads": threads, "tokens_per_text": length,
            "mean_tokens_per_text": float(encoded.lengths.mean()), "rows": rows,
            "mean_texts_per_s": float(np.mean([r["texts_per_s"] for r in rows])), "drawn_rows": drawn,
            "drawn_mean_texts_per_s": float(np.mean([r["texts_per_s"] for r in drawn]))}


def config(args: argparse.Namespace, mix: str) -> Config:
    rates = [float(x) for x in args.rates.split(",")] if args.rates else None
    slo_ms = args.slo_ms or SLO_MS[(args.model_arch, mix)]
    return Config(
        arch=args.model_arch, mix=mix, slo_ms=slo_ms, threads=args.threads,
        duration_s=args.duration,
        min_requests=args.min_requests, rates=rates,
        start_rps=args.start_rate or START_RPS.get((args.model_arch, mix), 10.0), max_rps=args.max_rate,
        max_steps=args.max_steps, warmup=args.warmup, drain_s=args.drain, drain_max_s=args.drain_max,
        timeout_s=args.timeout or max(30.0, 3 * slo_ms / 1000), connections=args.connections,
        ready_timeout_s=args.ready_timeout, seed=args.seed,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-arch", default=None, choices=ARCHS,
                   help="default bge-small-zh (tiny-zh with --quick)")
    p.add_argument("--mix", choices=("query", "mix", "both"), default=None,
                   help="request mix (default both; query with --quick)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {','.join(SERVERS)}")
    p.add_argument("--skip", default="", help="comma list of servers to leave out (e.g. infinity)")
    p.add_argument("--rerun", action="store_true", help="replace only the named --servers in the existing "
                   "results file of this arch and mix (each entry records when it was measured)")
    p.add_argument("--slo-ms", type=float, default=None, help="p99 SLO for every mix (default per arch and mix: "
                   + ", ".join(f"{a}/{m} {v:g}" for (a, m), v in SLO_MS.items()) + ")")
    p.add_argument("--max-queue-time", type=float, default=None,
                   help="a fixed runtime.serve --max-queue-time in seconds (default: --latency-target the mix's SLO)")
    p.add_argument("--ours-cache-size", type=int, default=0,
                   help="runtime.serve --cache-size (default 0: texts repeat across the ladder, nobody else caches)")
    p.add_argument("--threads", type=int, default=2, help="cores of every server: the naive servers' intra-op "
                   "threads; ours runs --ours-layout on them")
    p.add_argument("--ours-layout", default=None, help="runtime.serve's KxT (workers x threads each); default: "
                   "its own default on --threads cores (one worker per core, 1 thread each)")
    p.add_argument("--duration", type=float, default=None, help="seconds per rate step (default 30; 2 --quick)")
    p.add_argument("--min-requests", type=int, default=20, help="at least this many requests per step")
    p.add_argument("--rates", default=None, help="explicit comma list of offered rates (req/s): no adaptive ladder")
    p.add_argument("--start-rate", type=float, default=None, help="first rate of the adaptive ladder")
    p.add_argument("--max-rate", type=float, default=2000.0, help="ceiling of the adaptive ladder (req/s)")
    p.add_argument("--max-steps", type=int, default=None, help="rate steps per server (default 14; 6 --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default 20; 5 --quick)")
    p.add_argument("--drain", type=float, default=None, help="min seconds between steps (default 2; 0.5 --quick)")
    p.add_argument("--drain-max", type=float, default=60.0, help="max seconds to wait for an idle server")
    p.add_argument("--timeout", type=float, default=None,
                   help="client timeout per request in s (default: 30, or 3x the SLO if that is longer)")
    p.add_argument("--connections", type=int, default=1000, help="client connection pool size")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a server to be ready")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny-zh, short steps, few of them")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: ours and the naive servers (st-torch, ours) on the GPU in fp16; needs --artifact "
                        "and --checkpoint (an artifact with an fp16 variant); results get a -cuda suffix")
    p.add_argument("--artifact", type=Path, default=None, help="use this exported artifact instead of the cache's")
    p.add_argument("--checkpoint", type=Path, default=None, help="the checkpoint --artifact was exported from")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if (args.artifact is None) != (args.checkpoint is None):
        p.error("--artifact and --checkpoint go together")
    if args.device == "cuda" and args.artifact is None:
        p.error("--device cuda needs --artifact and --checkpoint (e.g. python -m benchmarks.gpu --keep DIR)")
    quick = args.quick
    args.model_arch = args.model_arch or ("tiny-zh" if quick else "bge-small-zh")
    args.mix = args.mix or ("query" if quick else "both")
    args.duration = args.duration or (2.0 if quick else 30.0)
    args.max_steps = args.max_steps or (6 if quick else 14)
    args.warmup = args.warmup if args.warmup is not None else (5 if quick else 20)
    args.drain = args.drain if args.drain is not None else (0.5 if quick else 2.0)
    if quick:
        args.min_requests = min(args.min_requests, 10)
    return args


async def amain(args: argparse.Namespace) -> int:
    skip = {s for s in args.skip.split(",") if s}
    names = [n for n in args.servers.split(",") if n and n not in skip]
    for n in names:
        if n not in SERVERS:
            raise SystemExit(f"unknown server {n!r}; choose from {', '.join(SERVERS)}")
    say(f"preparing {args.model_arch} (checkpoint, artifact, ST recipe graph; cached in {CACHE}) ...")
    files = ({"checkpoint": args.checkpoint, "artifact": args.artifact} if args.artifact is not None
             else prepare_files(args.model_arch))
    reference = reference_vectors(files["artifact"], args.threads)
    work = Workload.load(reference["instruction"])
    mixes = MIXES if args.mix == "both" else (args.mix,)
    for mix in mixes:
        result = await run_mix(mix, names, files, args, work, reference)
        print(report(result))
        print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
