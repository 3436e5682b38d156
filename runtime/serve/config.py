"""The server's settings: one frozen dataclass, filled from the command line, each option also readable
from an environment variable (``BGE_SERVE_<OPTION>``, for containers)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ..providers import usable_cores
from .budget import INITIAL_SHARE

ENV_PREFIX = "BGE_SERVE_"
LONE_MAX_THREADS = 4  # default cap on the lone lane's threads (ServeConfig.lone_lane)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    threads: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    max_inputs: int = 2048
    max_request_tokens: int = 262144
    max_body_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 1024 * 1024
    request_timeout: float = 30.0
    max_queue_time: float | None = None  # None: half the request timeout (or measured, with latency_target)
    latency_target: float | None = None
    max_queue_tokens: int | None = None
    max_loop_lag: float | None = None
    cache_size: int = 10000
    api_key: str | None = None
    tokenizer_workers: int = 2
    spinning: bool = False
    lone_threads: int | None = None
    drain_timeout: float = 60.0
    log_level: str = "info"
    access_log: bool = False

    def layout(self, device: str, kind: str = "embedder") -> tuple[int, int | None]:
        """(inference workers, intra-op threads each) per model. On CPU by default one worker per usable core,
        each with one thread: on a small batch, K runs of one thread do 1.3-1.8x the texts/s of one run on K
        threads (``benchmarks/layout.py``); ``threads`` alone splits the cores between ``cores // threads``
        workers. Rerankers default to one worker on every core instead: a rerank request is 20-100 pairs of
        mixed lengths, and split over one-thread workers its longest batch runs alone on one core at the end
        (1 x 20 pairs, bge-reranker-base INT8, 2 cores: 160 ms a request with 1 x 2, 219 ms with 2 x 1; both
        saturate near 4 requests/s under load). On CUDA one worker and onnxruntime's threads (more workers on
        one GPU: unmeasured)."""
        if device == "cuda":
            return self.workers or 1, self.threads
        cores = usable_cores()
        if kind == "reranker" and self.workers is None and self.threads is None:
            return 1, cores
        workers = self.workers or max(1, cores // (self.threads or 1))
        return workers, self.threads or max(1, cores // workers)

    def lone_lane(self, device: str, threads: int | None) -> int:
        """Threads of the lone lane (0: none): the second session a batch that finds the server idle at low
        load runs on (``ModelWorker``). By default on CPU when each worker has fewer threads than the usable
        cores: up to ``LONE_MAX_THREADS`` of them, spinning, because a query alone is faster on several
        threads (bge-small-zh INT8, 2 cores: p50 2.7 vs 3.2 ms a request at 18 req/s) but each thread past the
        first spins a core for ~35 ms after a run, and a 40-token query gains little past a few threads."""
        if device == "cuda":
            return 0
        if self.lone_threads is not None:
            return self.lone_threads if self.lone_threads >= 2 else 0
        cores = usable_cores()
        if (threads or cores) >= cores:
            return 0
        return min(cores, LONE_MAX_THREADS)

    @property
    def loop_lag_limit(self) -> float | None:
        """Event-loop lateness past which new requests are refused at once (--max-loop-lag; None: never). Off
        by default: measured on this 2-core VM with the load generator beside the server, it gave 160-930 req/s
        within the SLO at 2x the HTTP layer's capacity against 68-494 without (five pairs, overlapping), and
        refused 27 requests at 800 req/s that the server answered within the SLO when it was off."""
        return self.max_loop_lag or None

    @property
    def queue_time_budget(self) -> float:
        """The fixed budget, or the measured budget's starting value with --latency-target."""
        if self.latency_target is not None:
            return INITIAL_SHARE * self.latency_target
        return self.max_queue_time if self.max_queue_time is not None else self.request_timeout / 2


def parse_model(value: str) -> ModelSpec:
    """``NAME=DIR`` or ``DIR`` (named after the directory)."""
    name, sep, path = value.partition("=")
    if not sep:
        path, name = value, Path(value.rstrip("/")).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--model {value!r}: expected NAME=DIR or DIR")
    return ModelSpec(name=name, path=Path(path))


def _env(name: str, default: object) -> object:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return n


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return n


def _non_negative_float(v: str) -> float:
    x = float(v)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return x


def _positive_float(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return x


def _bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v}")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Show each default once: appended where the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description="Embedding and rerank server (OpenAI-, TEI- and Cohere-compatible) over artifacts written by "
        "`python -m export`. "
        f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION> "
        f"(e.g. {ENV_PREFIX}PORT=9000, {ENV_PREFIX}MODEL='bge=DIR other=DIR2'); the command line wins.",
        formatter_class=_DefaultsFormatter,
    )

    def opt(flag: str, **kw: object) -> None:
        kw["default"] = _env(flag.lstrip("-"), kw.get("default"))
        p.add_argument(flag, **kw)  # type: ignore[arg-type]

    env_models = os.environ.get(ENV_PREFIX + "MODEL", "")
    p.add_argument("--model", action="append", type=parse_model, default=None, metavar="NAME=DIR",
                   help="artifact directory to serve, as NAME=DIR or DIR (named after the directory); repeat for "
                   f"several models; the first of each kind (embedder, reranker) is that kind's default for requests naming "
                   f"none [{ENV_PREFIX}MODEL: "
                   "space-separated]")
    opt("--host", default="127.0.0.1", help="address to listen on")
    opt("--port", type=int, default=8080, help="port to listen on")
    opt("--device", default="auto", choices=["auto", "cpu", "cuda"], help="execution provider (cuda fails loudly "
        "when onnxruntime cannot give it)")
    opt("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
        help="artifact variant (auto: int8 on CPU, fp16 on CUDA)")
    opt("--workers", type=_positive_int, default=None, help="inference workers per model: graph runs in flight at "
        "once on one session (default on CPU: the usable cores divided by --threads; CUDA: 1)")
    opt("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads per worker (default on "
        "CPU: the usable cores divided by --workers, so 1 when both are unset)")
    opt("--batch-size", type=_positive_int, default=None, help="max texts per batch (default: the runtime's, 32 on "
        "CPU, 128 on CUDA)")
    opt("--max-batch-tokens", type=_positive_int, default=None, help="max padded tokens per batch (default: the "
        "runtime's, 16384 on CPU, 65536 on CUDA)")
    opt("--max-inputs", type=_positive_int, default=2048, help="max inputs per request (413 past it)")
    opt("--max-request-tokens", type=_positive_int, default=262144, help="max tokens per request (413 past it)")
    opt("--max-body-bytes", type=_positive_int, default=16 * 1024 * 1024,
        help="max request body size, checked before parsing (413 past it)")
    opt("--max-text-chars", type=_positive_int, default=1024 * 1024, help="max characters of one text that is "
        "tokenised whole (long_text chunk, or truncation off); 413 past it, before tokenising. With truncation on "
        "a long text is cut before tokenising and this does not apply")
    opt("--request-timeout", type=_positive_float, default=30.0, help="seconds a request may take before it gets "
        "504; its queued texts are dropped before they reach the model")
    opt("--max-queue-time", type=_positive_float, default=None, help="admission budget in seconds: a request is "
        "refused with 429 when, by the server's cost model, the running batch, the work queued ahead and its own "
        "texts (counted up to half the budget) would take longer than this (default: half the request timeout; "
        "for a latency SLO, pass --latency-target instead)")
    opt("--latency-target", type=_positive_float, default=None, help="latency SLO in seconds (a p99): the admission "
        "budget becomes this target less the overshoot (p99 of answer time minus admission's estimate) measured "
        "on the last 512 requests, kept within 0.5-0.9 of the target; starts at 0.7 of it. Replaces "
        "--max-queue-time")
    opt("--max-queue-tokens", type=_positive_int, default=None, help="fixed admission limit in queued tokens "
        "(overrides --max-queue-time)")
    opt("--max-loop-lag", type=_non_negative_float, default=None, help="seconds the event loop may run behind "
        "(requests waiting to be read, which no queue estimate sees) before new requests get 429 at once "
        "(default: never; the lag is measured either way: bge_event_loop_lag_seconds)")
    opt("--cache-size", type=_non_negative_int, default=10000, help="entries of the exact-match vector cache per "
        "server (0 turns it off)")
    opt("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    opt("--tokenizer-workers", type=_positive_int, default=2, help="threads that tokenise off the event loop")
    opt("--spinning", type=_bool, default=False, help="let onnxruntime's intra-op threads spin between runs "
        "(lower latency alone, but they take the cores from the event loop and tokenisation)")
    opt("--lone-threads", type=_non_negative_int, default=None, help="intra-op threads of the lone lane: a second "
        "session (the model's memory again) on which a batch that finds every worker idle at low load runs, its "
        "threads spinning for ~35 ms after a run for the next lone query; 0 or 1 turns it off (default on CPU: "
        f"the usable cores, at most {LONE_MAX_THREADS}, when each worker has fewer threads than that; CUDA and rerankers on every "
        "core: off)")
    opt("--drain-timeout", type=_positive_float, default=60.0, help="on SIGTERM, seconds to wait for accepted "
        "requests before exiting anyway")
    opt("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log level")
    opt("--access-log", type=_bool, default=False, help="log every request (costs throughput)")
    p.set_defaults(_env_models=env_models)
    return p


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = args.model
    if not models and args._env_models.strip():
        try:
            models = [parse_model(v) for v in args._env_models.split()]
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{ENV_PREFIX}MODEL: {exc}")
    if not models:
        parser.error("no model to serve: pass --model NAME=DIR (an artifact written by `python -m export`)")
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        parser.error(f"model names must be unique; repeated: {dupes}")
    # values from the environment arrive as strings: run them through the same type checks
    def typed(flag: str, value: object) -> object:
        action = next(a for a in parser._actions if a.dest == flag)
        if isinstance(value, str) and action.type is not None:
            try:
                return action.type(value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{ENV_PREFIX}{flag.upper()}: {exc}")
        if isinstance(value, str) and action.choices is not None and value not in action.choices:
            parser.error(f"{ENV_PREFIX}{flag.upper()}: {value!r} is not one of {list(action.choices)}")
        return value

    fields = {k: typed(k, v) for k, v in vars(args).items() if k not in ("model", "_env_models")}
    if fields["max_queue_time"] is not None and fields["latency_target"] is not None:
        parser.error("--max-queue-time and --latency-target both set the admission budget: pass one (a latency SLO: "
                     "--latency-target; a fixed budget: --max-queue-time)")
    return ServeConfig(models=tuple(models), **fields)  # type: ignore[arg-type]
