"""Prometheus metrics of the server: requests, the latency split (queue, tokenisation, inference), batch
shapes, queue depth and cache hits. One registry per app, so tests can run several apps in a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TEXTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bge_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "bge_request_duration_seconds", "Time from receiving a request to answering it.", ["route"],
            buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram(
            "bge_queue_duration_seconds", "Per request: longest wait of its texts between admission and the "
            "start of their batch.", ["model"], buckets=_LATENCY, registry=r)
        self.tokenize_seconds = Histogram(
            "bge_tokenization_duration_seconds", "Per request: tokenisation time.", ["model"], buckets=_LATENCY,
            registry=r)
        self.inference_seconds = Histogram(
            "bge_inference_duration_seconds", "Per batch: one graph run.", ["model"], buckets=_LATENCY, registry=r)
        self.batch_texts = Histogram("bge_batch_size", "Texts per batch.", ["model"], buckets=_TEXTS, registry=r)
        self.batch_tokens = Histogram(
            "bge_batch_padded_tokens", "Padded tokens (texts x length) per batch.", ["model"], buckets=_TOKENS,
            registry=r)
        self.queue_texts = Gauge("bge_queue_texts", "Texts waiting for the model.", ["model"], registry=r)
        self.queue_tokens = Gauge("bge_queue_tokens", "Tokens waiting for the model.", ["model"], registry=r)
        self.cache_hits = Counter("bge_cache_hits", "Texts answered from the vector cache.", ["model"], registry=r)
        self.cache_misses = Counter("bge_cache_misses", "Texts not in the vector cache.", ["model"], registry=r)
        self.embedded_texts = Counter("bge_embedded_texts", "Texts run through the model.", ["model"], registry=r)
        self.prompt_tokens = Counter("bge_prompt_tokens", "Tokens of answered requests.", ["model"], registry=r)
        self.dropped_texts = Counter(
            "bge_dropped_texts", "Texts dropped before reaching the model (their request timed out or its client "
            "went away).", ["model", "reason"], registry=r)
        self.busy_workers = Gauge(
            "bge_busy_workers", "Inference workers running a batch now (saturated when it stays at "
            "bge_workers).", ["model"], registry=r)
        self.workers = Gauge("bge_workers", "Inference workers of the model.", ["model"], registry=r)
        self.lone_runs = Counter(
            "bge_lone_runs", "Batches run on the lone lane (every worker idle, low load: the model's second "
            "session, on several spinning threads).", ["model"], registry=r)
        self.queue_budget = Gauge(
            "bge_queue_budget_seconds", "Predicted completion time admission accepts (--max-queue-time, or "
            "--latency-target less the overshoot measured on recent requests).", ["model"], registry=r)
        self.tail_admitted = Counter(
            "bge_tail_admitted_requests", "Requests admitted over the queue budget, estimated at most 1.5x "
            "--latency-target, on the p99's tail (at most 0.5% of recent admissions).", ["model"], registry=r)
        self.shed_requests = Counter(
            "bge_shed_requests", "Requests refused with 429 because the queue was full.", ["model"], registry=r)
        self.loop_lag = Gauge(
            "bge_event_loop_lag_seconds", "How late the event loop runs (smoothed): what a request waits before the "
            "server reads it; saturated when it stays up.", registry=r)
        self.loop_shed = Counter(
            "bge_loop_shed_requests", "Requests refused with 429 because the event loop ran behind --max-loop-lag.",
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
