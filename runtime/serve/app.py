"""The HTTP layer: routes, request checks, responses and the server's lifecycle (starting, ready,
draining). Starlette on uvicorn, orjson for bodies; the inference work is in ``engine``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..chunking import pool_windows
from ..embedder import Embedder, RowPlan
from ..errors import EmbedderError, InputTooLongError
from ..manifest import MANIFEST_NAME, Manifest
from ..pairs import PairEncoded
from ..reranker import Reranker, sigmoid
from ..providers import resolve_device
from .cache import VectorCache
from .config import ServeConfig
from .looplag import LoopLag
from .engine import Job, ModelWorker
from .errors import ApiError, QueueFull, bad_request, too_large
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import (M3_KEYS, EmbedRequest, RerankRequest, parse_cohere_rerank, parse_encoding, parse_m3_outputs,
                       parse_openai, parse_tei, parse_tei_rerank)
from .tokenize import Tokenization

log = logging.getLogger("runtime.serve")

_JSON = "application/json"


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, _JSON)


def error_response(err: ApiError) -> Response:
    return json_response(err.body(), err.status, err.headers)


class ServerState:
    """Phase of the server and the number of requests it has accepted and not yet answered."""

    def __init__(self) -> None:
        self.phase = "starting"  # -> ready -> draining; or -> failed
        self.detail = "loading models"
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def begin_drain(self) -> None:
        if self.phase != "failed":
            self.phase = "draining"
            self.detail = "shutting down: finishing accepted requests"

    def wait_idle(self, timeout: float) -> bool:
        """Block until every accepted request is answered (True) or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.in_flight == 0:
                return True
            time.sleep(0.01)
        return self.in_flight == 0


class EmbeddingService:
    """Everything the routes share: config, models, cache, metrics, state."""

    def __init__(self, config: ServeConfig, on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.cache = VectorCache(config.cache_size)
        self.state = ServerState()
        self.workers: dict[str, ModelWorker] = {}
        self.digests: dict[str, str] = {}
        self.default_model = config.models[0].name
        self.tokenization = Tokenization(config.tokenizer_workers, config.queue_time_budget)
        self.on_fatal = on_fatal
        self.loop_lag = LoopLag()
        self.loop_shed = 0  # requests refused by check_loop (for /info; the metric counts them too)
        self._loop_lag_limit = config.loop_lag_limit
        self._m_request_counters: dict[tuple[str, int], Any] = {}
        self._loader = threading.Thread(target=self._load_all, name="load-models", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader.start()

    def _load_all(self) -> None:
        cfg = self.config
        try:
            for i, spec in enumerate(cfg.models):
                self.state.detail = f"loading model {spec.name!r} ({i + 1} of {len(cfg.models)})"
                kind = Manifest.load(spec.path).kind
                workers, threads = cfg.layout(resolve_device(cfg.device), kind)
                model_class = Reranker if kind == "reranker" else Embedder
                emb = model_class(spec.path, device=cfg.device, precision=cfg.precision, threads=threads,
                                  max_batch_tokens=cfg.max_batch_tokens, spinning=cfg.spinning, workers=workers)
                lone = cfg.lone_lane(emb.device, threads)
                if lone:
                    emb.open_lone_session(lone)
                worker = ModelWorker(spec.name, emb, self.cache, self.metrics, max_batch_size=cfg.batch_size,
                                     max_queue_time=None if cfg.latency_target else cfg.queue_time_budget,
                                     max_queue_tokens=cfg.max_queue_tokens, latency_target=cfg.latency_target)
                self.state.detail = f"warming up model {spec.name!r}"
                t0 = time.perf_counter()
                worker.warm_up()
                worker.start()
                self.digests[spec.name] = hashlib.sha256((spec.path / MANIFEST_NAME).read_bytes()).hexdigest()
                self.workers[spec.name] = worker
                log.info("%s %r ready: %s, %s on %s, %d worker(s) x %s thread(s), lone lane %s, dim %d, max length "
                         "%d, warm-up %.2f s, one text of 32 tokens %.1f ms, 32 of 32 %.1f ms", kind, spec.name,
                         spec.path, emb.precision, emb.providers[0], workers, threads or "auto",
                         f"{lone} threads" if lone else "off", emb.dim, emb.max_length, time.perf_counter() - t0,
                         worker.cost.predict(1, 32) * 1e3, worker.cost.predict(32, 32) * 1e3)
        except (EmbedderError, OSError, ValueError) as exc:
            self.state.phase = "failed"
            self.state.detail = f"cannot load models: {exc}"
            log.error("%s", self.state.detail)
            if self.on_fatal is not None:
                self.on_fatal(self.state.detail)
            return
        if self.state.phase == "starting":
            self.state.phase = "ready"
            self.state.detail = "ready"

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.tokenization.close()

    # -- shared checks -----------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key this "
                           "server was started with (--api-key)", type="authentication_error",
                           code="invalid_api_key")

    def check_loop(self) -> None:
        """Refuse at once, before the body is read, while the event loop runs behind (see looplag.py)."""
        self.loop_lag.request_seen()  # the lag is measured (metric, /info) whether or not it sheds
        limit = self._loop_lag_limit
        if limit is not None and self.loop_lag.seconds > limit:
            self.loop_shed += 1
            self.metrics.loop_shed.inc()
            raise ApiError(429, f"server is overloaded: it reads requests {self.loop_lag.seconds * 1000:.0f} ms late "
                           f"(limit {limit * 1000:.0f} ms, --max-loop-lag); retry after 1 s or send to another replica",
                           type="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})

    def check_ready(self) -> None:
        phase = self.state.phase
        if phase != "ready":
            raise ApiError(503, f"server is {phase} ({self.state.detail}); retry shortly or use another replica",
                           type="service_unavailable", code=phase, headers={"Retry-After": "1"})

    def worker_for(self, model: str | None, kind: str = "embedder") -> ModelWorker:
        """The worker of ``model`` (default: the first model of ``kind`` on the command line), which must be
        of ``kind``: an embedder asked to rerank, or a reranker asked to embed, is a 400 naming the right ones."""
        if model is None:
            name = next((n for n, w in self.workers.items() if w.embedder.manifest.kind == kind), None)
            if name is None:
                raise ApiError(400, f"no {kind} is served here (served: {self._kinds()}); start the server with "
                               f"--model NAME=DIR for a {kind} artifact", param="model", code="model_not_found")
        else:
            name = model
        worker = self.workers.get(name)
        if worker is None:
            raise ApiError(404, f"model {name!r} is not served here; served models: {sorted(self.workers)}",
                           param="model", code="model_not_found")
        got = worker.embedder.manifest.kind
        if got != kind:
            verb = {"embedder": "embed text (/v1/embeddings, /embed)", "reranker": "rerank (/rerank, /v1/rerank)"}
            raise ApiError(400, f"model {name!r} is a {got}: it cannot {verb[kind].split(' (')[0]}. Use it to "
                           f"{verb[got]}; models served: {self._kinds()}", param="model", code="wrong_model_kind")
        return worker

    def _kinds(self) -> dict[str, str]:
        return {n: w.embedder.manifest.kind for n, w in self.workers.items()}

    async def read_json(self, request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media != _JSON and not media.endswith("+json"):
            got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json'; got {got} "
                           "(curl: add -H 'Content-Type: application/json')", code="unsupported_media_type")
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(f"request body of {declared} bytes is over this server's limit of {limit} bytes "
                            "(--max-body-bytes); send fewer or shorter inputs per request", None, "body_too_large")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"request body is over this server's limit of {limit} bytes (--max-body-bytes); "
                                "send fewer or shorter inputs per request", None, "body_too_large")
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from exc

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        child = self._m_request_counters.get(key)
        if child is None:
            child = self._m_request_counters[key] = self.metrics.requests.labels(route, str(status))
        child.inc()

    # -- embedding ---------------------------------------------------------------------------
    async def embed(self, request: Request, req: EmbedRequest, arrived: float,
                    heads: bool = False) -> tuple[ModelWorker, np.ndarray, int, dict, Job]:
        """Tokenise, check, answer from the cache what it holds, queue the rest and wait for it. ``heads``:
        bge-m3's lexical weights and ColBERT matrices too (the job holds them; no cache). Returns the worker,
        the vectors, the token count, the timing headers and the job."""
        worker = self.worker_for(req.model)
        emb = cast(Embedder, worker.embedder)  # worker_for checked the kind
        if heads and not emb.has_m3_heads:
            served = [n for n, w in self.workers.items() if getattr(w.embedder, "has_m3_heads", False)]
            raise bad_request(f"model {worker.name!r} has no sparse or ColBERT outputs (only bge-m3 exports have "
                              f"them); models that do: {served or 'none served here'}", "model", "no_sparse_output")
        if heads and req.long_text == "chunk":
            raise bad_request("'long_text': \"chunk\" pools dense windows; sparse and ColBERT outputs take "
                              "\"truncate\" or \"error\"", "long_text")
        if req.dimensions is not None and req.dimensions != emb.dim:
            raise bad_request(f"'dimensions' {req.dimensions} is not supported: model {worker.name!r} gives "
                              f"{emb.dim}-dimensional vectors and is not trained for truncated ones; omit "
                              f"'dimensions' or pass {emb.dim}", "dimensions", "unsupported_dimensions")
        if not req.normalize and emb.manifest.normalize:
            raise bad_request(f"'normalize': false is not supported: model {worker.name!r} L2-normalises inside "
                              "its graph (its manifest says so); omit it or pass true", "normalize")
        t_tok = time.perf_counter()
        digest = self.digests[worker.name]
        plan: RowPlan | None = None
        if req.texts is not None:
            self._check_chars(req)
            prefix = emb.manifest.query_instruction if req.query else ""
            texts = [prefix + t for t in req.texts] if prefix else req.texts
            try:
                plan = await self.tokenization.run(_chars_to_tokenize(emb, texts, req.long_text), self._plan, emb,
                                                   texts, req)
            except QueueFull as full:
                self.metrics.shed_requests.labels(worker.name).inc()
                raise _queue_full(worker.name, full) from None
            ids = plan.rows
        else:
            if req.query:
                raise bad_request("'input_type': \"query\" needs text input (the query instruction is text); "
                                  "send text, or prepend the instruction's ids yourself", "input_type")
            ids = self._check_ids(emb, req)
        # what reaches the model is the row of ids (instruction, truncation and windows included): key by it,
        # as bytes, so a huge text costs the cache no more than its first max_length tokens
        keys: list[Hashable] = [(digest, np.asarray(row, dtype=np.int32).tobytes()) for row in ids]
        tokenize_s = time.perf_counter() - t_tok
        self.metrics.tokenize_seconds.labels(worker.name).observe(tokenize_s)
        n_tokens = sum(len(r) for r in ids)
        if n_tokens > self.config.max_request_tokens:
            raise too_large(f"'{req.param}' has {n_tokens} tokens in all, more than this server's limit of "
                            f"{self.config.max_request_tokens} per request (--max-request-tokens); split it",
                            req.param, "too_many_tokens")
        job, headers = await self._run_rows(request, worker, ids, keys, None, n_tokens, tokenize_s, arrived, heads)
        vectors = job.vectors
        if plan is not None and len(plan.rows) != len(req):
            vectors = _pool(plan, vectors, emb.manifest.normalize)
        headers["x-windows"] = str(len(ids))
        return worker, vectors, n_tokens, headers, job

    async def _run_rows(self, request: Request, worker: ModelWorker, ids: list[list[int]], keys: list[Hashable],
                        segments: list[int] | None, n_tokens: int, tokenize_s: float, arrived: float,
                        heads: bool = False) -> tuple[Job, dict]:
        """What every route does with its token rows: answer from the cache what it holds, queue the rest in the
        model's workers (admission may refuse: 429), wait for them, count; the job (one output row per token
        row) and the timing headers."""
        loop = asyncio.get_running_loop()
        job = Job(n=len(ids), dim=worker.embedder.dim, deadline=arrived + self.config.request_timeout, loop=loop,
                  future=loop.create_future(), heads=heads)
        rows, queued_segments, hits = [], [], 0
        use_cache = self.cache.capacity > 0 and not heads  # the cache holds dense rows only
        for i, (row, key) in enumerate(zip(ids, keys)):
            cached = self.cache.get(key) if use_cache else None
            if cached is not None:
                job.vectors[i] = cached
                hits += 1
            else:
                rows.append((i, row, key if use_cache else None))
                if segments is not None:
                    queued_segments.append(segments[i])
        if use_cache:
            self.metrics.cache_hits.labels(worker.name).inc(hits)
            self.metrics.cache_misses.labels(worker.name).inc(len(rows))
        if rows:
            try:
                worker.submit(job, rows, queued_segments if segments is not None else None)
            except QueueFull as full:
                raise _queue_full(worker.name, full) from None
            await self._wait(request, job, arrived)
            worker.observe_latency(job, time.monotonic() - arrived)
        self.metrics.prompt_tokens.labels(worker.name).inc(n_tokens)
        headers = {
            "x-tokenization-time": f"{tokenize_s * 1000:.3f}",
            "x-queue-time": f"{job.queue_time * 1000:.3f}",
            "x-inference-time": f"{job.inference_time * 1000:.3f}",
            "x-cache-hits": str(hits),
        }
        return job, headers

    # -- reranking ---------------------------------------------------------------------------
    async def rerank(self, request: Request, req: RerankRequest, arrived: float) -> tuple[ModelWorker, np.ndarray, int, dict]:
        """Tokenise the pairs, answer from the cache what it holds, queue the rest with the model's other work
        (pairs batch across requests like texts) and wait. Returns the worker, the logits in passage order, the
        token count and the timing headers."""
        worker = self.worker_for(req.model, "reranker")
        rr = cast(Reranker, worker.embedder)  # worker_for checked the kind
        t_tok = time.perf_counter()
        cap = rr.max_length * 8  # characters a side can reach the model with (the tokenizer cuts the rest first)
        chars = min(len(req.query), cap) * len(req.texts) + sum(min(len(t), cap) for t in req.texts)
        try:
            enc = await self.tokenization.run(chars, self._pairs, rr, req)
        except QueueFull as full:
            self.metrics.shed_requests.labels(worker.name).inc()
            raise _queue_full(worker.name, full) from None
        tokenize_s = time.perf_counter() - t_tok
        self.metrics.tokenize_seconds.labels(worker.name).observe(tokenize_s)
        n_tokens = int(enc.lengths.sum())
        if n_tokens > self.config.max_request_tokens:
            raise too_large(f"the pairs of '{req.param}' have {n_tokens} tokens in all, more than this server's limit "
                            f"of {self.config.max_request_tokens} per request (--max-request-tokens); split it",
                            req.param, "too_many_tokens")
        digest = self.digests[worker.name]
        types = rr.reads_token_types
        keys: list[Hashable] = [(digest, np.asarray(row, dtype=np.int32).tobytes(), seg if types else 0)
                                for row, seg in zip(enc.ids, enc.segment_start)]
        job, headers = await self._run_rows(request, worker, enc.ids, keys, enc.segment_start if types else None,
                                            n_tokens, tokenize_s, arrived)
        headers["x-truncated-pairs"] = str(len(enc.truncated))
        return worker, job.vectors[:, 0].copy(), n_tokens, headers

    def _pairs(self, rr: Reranker, req: RerankRequest) -> PairEncoded:
        try:
            return rr.tokenize_pairs([(req.query, t) for t in req.texts], truncate=req.truncate)
        except InputTooLongError as exc:
            raise bad_request(f"'{req.param}[{exc.index}]' with the query has {exc.n_tokens} tokens, more than the "
                              f"model's max length of {rr.max_length}; shorten it, or send \"truncate\": true to cut "
                              "the passage to fit", req.param, "input_too_long") from exc
        except (TypeError, ValueError) as exc:
            raise bad_request(f"'{req.param}': {exc}", req.param, "invalid_text") from exc

    async def _wait(self, request: Request, job: Job, arrived: float) -> None:
        """Wait for the job until its deadline; if the client leaves or the deadline passes first, mark the
        job cancelled so the worker drops its texts before they reach the model."""
        timeout = max(0.0, job.deadline - time.monotonic())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, watcher}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if job.future.done():
            if job.error is not None:
                raise ApiError(500, f"the model failed on this request: {job.error}", type="server_error",
                               code="inference_failed")
            return
        job.cancelled = "disconnected" if watcher in done else "deadline"
        if watcher in done:
            raise ApiError(499, "client closed the request", code="client_closed")
        raise ApiError(504, f"request not answered within its deadline of {self.config.request_timeout:g} s "
                       "(--request-timeout); its remaining work was dropped. Send fewer texts per request or "
                       "retry when the server is less loaded", type="timeout", code="deadline_exceeded")

    def _plan(self, emb: Embedder, texts: list[str], req: EmbedRequest) -> RowPlan:
        """Token rows as ``Embedder.embed`` would run them (truncated, or windows for ``long_text`` chunk)."""
        try:
            return emb.plan_rows(texts, req.long_text)
        except InputTooLongError as exc:
            count = f"at least {exc.n_tokens}" if exc.at_least else str(exc.n_tokens)
            raise bad_request(f"'{req.param}[{exc.index}]' has {count} tokens, more than the model's max "
                              f"length of {emb.max_length}; shorten it, send \"truncate\": true to keep its first "
                              f"{emb.max_length} tokens, or \"long_text\": \"chunk\" to embed all of it",
                              req.param, "input_too_long") from exc
        except (TypeError, ValueError) as exc:
            raise bad_request(f"'{req.param}': {exc}", req.param, "invalid_text") from exc

    def _check_chars(self, req: EmbedRequest) -> None:
        """Refuse at once, before tokenising, a text too large to tokenise whole (``long_text`` chunk or error;
        truncation cuts a long text before tokenising, so it needs no such limit)."""
        if req.long_text == "truncate":
            return
        limit = self.config.max_text_chars
        for i, t in enumerate(req.texts or ()):
            if len(t) > limit:
                raise too_large(f"'{req.param}[{i}]' has {len(t)} characters, more than this server tokenises "
                                f"whole ({limit}, --max-text-chars) with long_text {req.long_text!r}; split it, or "
                                "send \"truncate\": true to embed its first tokens", req.param, "text_too_large")

    def _check_ids(self, emb: Embedder, req: EmbedRequest) -> list[list[int]]:
        vocab, limit = emb.vocab_size, emb.max_length
        head, tail = emb.special_ids
        rows = req.token_ids or []
        for i, row in enumerate(rows):
            if len(row) < len(head) + len(tail) or row[: len(head)] != head or row[len(row) - len(tail):] != tail:
                raise bad_request(
                    f"'{req.param}[{i}]' is not a token-id list this model's tokenizer makes: those start with "
                    f"{head} and end with {tail} (its special tokens), this one starts with {row[:len(head)]} and "
                    f"ends with {row[len(row) - len(tail):]}. Send the text instead; ids from another tokenizer "
                    "(e.g. tiktoken's) give wrong vectors. LangChain's OpenAIEmbeddings sends tiktoken ids by "
                    "default: construct it with check_embedding_ctx_length=False", req.param, "foreign_token_ids")
            if len(row) > limit:
                raise bad_request(f"'{req.param}[{i}]' has {len(row)} token ids, more than the model's max length "
                                  f"of {limit}", req.param, "input_too_long")
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise bad_request(f"'{req.param}[{i}]' holds token id {bad}, outside the model's vocabulary "
                                  f"[0, {vocab}); token ids must come from this model's tokenizer (special "
                                  "tokens included, as it encodes a text)", req.param, "invalid_token_id")
        return rows


def _chars_to_tokenize(emb: Embedder, texts: list[str], long_text: str) -> int:
    """Characters the tokenizer will look at: in truncate mode a long text is cut to about 8 characters per
    token of max length (English; CJK needs 1), with chunking all of it is tokenised, and refusing one needs
    its token count (up to the runtime's cut)."""
    cap = {"truncate": emb.max_length * 8, "error": emb.max_text_chars}.get(long_text)
    return sum(len(t) for t in texts) if cap is None else sum(min(len(t), cap) for t in texts)


def _queue_full(name: str, full: QueueFull) -> ApiError:
    return ApiError(429, f"model {name!r} is at capacity ({full.reason}); retry after {full.retry_after_s} s or "
                    "send to another replica", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(full.retry_after_s)})


def _model_card(name: str, kind: str) -> dict:
    """A model as OpenAI's ``/v1/models`` lists it, with its kind (embedder or reranker)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "bge-onnx", "kind": kind}


def _pool(plan: RowPlan, rows: np.ndarray, normalize: bool) -> np.ndarray:
    """One vector per text from its windows' vectors (token-weighted mean), as ``Embedder.embed`` pools."""
    n = len(plan.first_row) - 1
    out = np.empty((n, rows.shape[1]), dtype=np.float32)
    for i in range(n):
        a, b = int(plan.first_row[i]), int(plan.first_row[i + 1])
        out[i] = rows[a] if b - a == 1 else pool_windows(rows[a:b], plan.token_counts[a:b], normalize)
    return out


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next ASGI message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ranked(req: RerankRequest, logits: np.ndarray) -> list[tuple[int, float]]:
    """(index, score) best first (ties: input order), the first ``top_n``; sigmoid unless raw scores."""
    scores = logits.astype(np.float64) if req.raw_scores else sigmoid(logits)
    order = np.argsort(-scores, kind="stable")[: req.top_n]
    return [(int(i), float(scores[i])) for i in order]


def _sparse_body(weights: dict[int, float]) -> list[dict[str, float | int]]:
    """TEI's sparse vector: ``[{"index": token id, "value": weight}]``, by token id."""
    return [{"index": t, "value": w} for t, w in sorted(weights.items())]


def _b64(matrix: np.ndarray) -> str:
    """A vector or matrix as base64 of its little-endian float32 bytes, row-major (OpenAI's ``base64``)."""
    return base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")


def _encoded(rows: Sequence[np.ndarray], encoding: str) -> list:
    """One item per text: the array itself (orjson writes it as nested lists) or its base64 string."""
    return [_b64(r) for r in rows] if encoding == "base64" else list(rows)


def _openai_body(name: str, vectors: np.ndarray, n_tokens: int, encoding: str) -> dict:
    items = _encoded(vectors, encoding)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


def create_app(config: ServeConfig, on_fatal: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app. Models load in a background thread once it starts, so /health can say 503 meanwhile."""
    svc = EmbeddingService(config, on_fatal)

    def route(path: str, *, open_route: bool = False, embedding: bool = False):
        """Wrap a handler: API key, readiness, request metrics, and errors as OpenAI bodies."""
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                arrived = time.monotonic()
                t0 = time.perf_counter()
                if embedding:
                    svc.state.enter()
                try:
                    if not open_route:
                        svc.check_key(request)
                    if embedding:
                        svc.check_ready()
                        svc.check_loop()
                    response = await handler(request, arrived)
                except ApiError as err:
                    response = error_response(err)
                except Exception:  # noqa: BLE001 - the boundary: log it, never a traceback in a body
                    log.exception("unhandled error on %s %s", request.method, path)
                    response = error_response(ApiError(500, "internal error; the server log has the details",
                                                       type="server_error", code="internal_error"))
                finally:
                    if embedding:
                        svc.state.leave()
                status = response.status_code
                svc.count(path, status)
                svc.metrics.request_seconds.labels(path).observe(time.perf_counter() - t0)
                response.headers["x-total-time"] = f"{(time.perf_counter() - t0) * 1000:.3f}"
                return response
            return endpoint
        return wrap

    @route("/v1/embeddings", embedding=True)
    async def openai_embeddings(request: Request, arrived: float) -> Response:
        req = parse_openai(await svc.read_json(request), config.max_inputs)
        worker, vectors, n_tokens, headers, _ = await svc.embed(request, req, arrived)
        return json_response(_openai_body(worker.name, vectors, n_tokens, req.encoding), 200, headers)

    async def tei(request: Request, arrived: float) -> Response:
        req = parse_tei(await svc.read_json(request), config.max_inputs)
        _, vectors, _, headers, _ = await svc.embed(request, req, arrived)
        return json_response(vectors, 200, headers)

    # TEI answers POST / and /invocations (SageMaker) by the model's kind: huggingface_hub's InferenceClient
    # and langchain-huggingface post to the bare URL
    tei_embed, tei_root, tei_invocations = (route(p, embedding=True)(tei) for p in ("/embed", "/", "/invocations"))

    async def tei_rerank(request: Request, arrived: float) -> Response:
        req = parse_tei_rerank(await svc.read_json(request), config.max_inputs)
        _, logits, _, headers = await svc.rerank(request, req, arrived)
        body = [{"index": i, "score": s, **({"text": req.texts[i]} if req.return_text else {})}
                for i, s in _ranked(req, logits)]
        return json_response(body, 200, headers)

    async def cohere_rerank(request: Request, arrived: float) -> Response:
        req = parse_cohere_rerank(await svc.read_json(request), config.max_inputs)
        worker, logits, n_tokens, headers = await svc.rerank(request, req, arrived)
        results = [{"index": i, "relevance_score": s, **({"document": {"text": req.texts[i]}} if req.return_text else {})}
                   for i, s in _ranked(req, logits)]
        body = {"id": headers.get("x-request-id") or f"rerank-{time.time_ns():x}", "results": results,
                "model": worker.name, "usage": {"total_tokens": n_tokens},
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}
        return json_response(body, 200, headers)

    # bge-m3: TEI's sparse route, its per-token route (here: the ColBERT vectors), and all three in one pass
    @route("/embed_sparse", embedding=True)
    async def tei_sparse(request: Request, arrived: float) -> Response:
        req = parse_tei(await svc.read_json(request), config.max_inputs)
        _, _, _, headers, job = await svc.embed(request, req, arrived, heads=True)
        return json_response([_sparse_body(w) for w in job.lexical], 200, headers)

    @route("/embed_all", embedding=True)
    async def tei_all(request: Request, arrived: float) -> Response:
        body = await svc.read_json(request)
        encoding = parse_encoding(body)
        req = parse_tei({k: v for k, v in body.items() if k not in M3_KEYS}, config.max_inputs)
        _, _, _, headers, job = await svc.embed(request, req, arrived, heads=True)
        return json_response(_encoded(job.colbert, encoding), 200, headers)

    @route("/encode", embedding=True)
    async def m3_encode(request: Request, arrived: float) -> Response:
        body = await svc.read_json(request)
        want, encoding = parse_m3_outputs(body), parse_encoding(body)
        req = parse_tei({k: v for k, v in body.items() if k not in M3_KEYS}, config.max_inputs)
        worker, vectors, n_tokens, headers, job = await svc.embed(request, req, arrived, heads=want[1] or want[2])
        out = {"model": worker.name, "dense_vecs": _encoded(vectors, encoding) if want[0] else None,
               "lexical_weights": [{str(t): w for t, w in d.items()} for d in job.lexical] if want[1] else None,
               "colbert_vecs": _encoded(job.colbert, encoding) if want[2] else None,
               "encoding_format": encoding, "dimension": int(vectors.shape[1]),
               "colbert_dim": worker.embedder.manifest.m3.colbert_dim if want[2] else None,
               "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        return json_response(out, 200, headers)

    rerank_tei = route("/rerank", embedding=True)(tei_rerank)
    rerank_v1, rerank_v2 = (route(p, embedding=True)(cohere_rerank) for p in ("/v1/rerank", "/v2/rerank"))

    @route("/health", open_route=True)
    async def health(request: Request, arrived: float) -> Response:
        if svc.state.phase != "ready":
            raise ApiError(503, f"server is {svc.state.phase}: {svc.state.detail}", type="service_unavailable",
                           code=svc.state.phase)
        return json_response({"status": "ok", "models": sorted(svc.workers)})

    @route("/v1/models")
    async def models(request: Request, arrived: float) -> Response:
        return json_response({"object": "list", "data": [_model_card(name, w.embedder.manifest.kind)
                                                         for name, w in svc.workers.items()]})

    @route("/v1/models/{id}")
    async def model(request: Request, arrived: float) -> Response:
        name = request.path_params["model_id"]
        if name not in svc.workers:
            raise ApiError(404, f"model {name!r} is not served here; served models: {sorted(svc.workers)}",
                           param="model", code="model_not_found")
        return json_response(_model_card(name, svc.workers[name].embedder.manifest.kind))

    @route("/info")
    async def info(request: Request, arrived: float) -> Response:
        out = []
        for name, w in svc.workers.items():
            e, m = w.embedder, w.embedder.manifest
            out.append({
                "name": name, "kind": m.kind, "dimension": e.dim, "max_length": e.max_length, "precision": e.precision,
                "device": e.device, "provider": e.providers[0], "workers": e.workers, "threads": e.threads,
                "lone_threads": e.lone_threads, "lone_runs": w.lone_runs, "pooling": m.pooling, "normalize": m.normalize,
                "query_instruction": m.query_instruction, "source_model": m.source.model,
                "source_revision": m.source.revision, "random_weights": m.source.random_weights,
                "manifest_sha256": svc.digests[name],
                "cost_model": {"seconds_per_run": float(w.cost.coef[0]), "seconds_per_token": float(w.cost.coef[1]),
                               "seconds_per_text_length_squared": float(w.cost.coef[2]),
                               "scale": float(w.cost.scale)},
                "queue_seconds": w.queue_seconds(),
                "queue_budget_seconds": w.budget.seconds,
                "measured_overshoot_seconds": w.budget.overshoot if w.budget.adaptive else None,
                "tail_admitted_requests": w.budget.tail_admitted,
            })
        limits = {k: getattr(config, k) for k in ("max_inputs", "max_request_tokens", "max_body_bytes",
                                                  "request_timeout", "cache_size")}
        limits["max_queue_time"] = None if config.latency_target else config.queue_time_budget
        limits["latency_target"] = config.latency_target
        limits["max_loop_lag"] = config.loop_lag_limit
        loop = {"lag_seconds": svc.loop_lag.seconds, "shed_requests": svc.loop_shed}
        return json_response({"version": __version__, "status": svc.state.phase, "models": out, "limits": limits,
                              "event_loop": loop})

    @route("/metrics")
    async def metrics(request: Request, arrived: float) -> Response:
        svc.metrics.loop_lag.set(svc.loop_lag.seconds)
        return Response(svc.metrics.render(), 200, media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"no route {request.method} {request.url.path}; routes: POST /v1/embeddings, POST /embed (also POST "
               "/ and /invocations), POST /rerank (TEI), POST /v1/rerank and /v2/rerank (Cohere, Jina), "
               "GET /v1/models[/ID], GET /info, GET /health, GET /metrics")
        return error_response(ApiError(exc.status_code, msg, code=code))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal error; the server log has the details", type="server_error",
                                       code="internal_error"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        svc.start_loading()
        svc.loop_lag.start()
        try:
            yield
        finally:
            await svc.loop_lag.stop()
            svc.close()

    app = _App(
        routes=[
            Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
            Route("/embeddings", openai_embeddings, methods=["POST"]),
            Route("/embed", tei_embed, methods=["POST"]),
            Route("/", tei_root, methods=["POST"]),
            Route("/invocations", tei_invocations, methods=["POST"]),
            Route("/embed_sparse", tei_sparse, methods=["POST"]),
            Route("/embed_all", tei_all, methods=["POST"]),
            Route("/encode", m3_encode, methods=["POST"]),
            Route("/rerank", rerank_tei, methods=["POST"]),
            Route("/v1/rerank", rerank_v1, methods=["POST"]),
            Route("/v2/rerank", rerank_v2, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.service = svc
    app.direct = {r.path: r.endpoint for r in app.routes
                  if isinstance(r, Route) and r.methods == {"POST"} and "{" not in r.path}
    return app


class _App(Starlette):
    """Starlette, with the fixed-path POST routes (every embedding and rerank route) dispatched straight to
    their endpoint, which turns every error into a response itself: Starlette's middleware stack and router
    cost about 0.1 ms of CPU per request (a tenth of a small-model request's server time, measured)."""

    direct: dict[str, Callable[[Request], Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.direct.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
