"""Console output of the export: progress of the slow steps on stderr, the final table on stdout."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _peak_gib() -> float:
    """The process's peak resident memory (Linux reports KiB): printed after each step, so the step that
    raised it shows, and a user can size the machine an export needs."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Progress:
    def __init__(self, total: int, stream=None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        print(f"[{self.done}/{self.total}] {what} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        print(f"      done in {time.perf_counter() - start:.1f}s (process peak memory so far {_peak_gib():.1f} GiB)",
              file=self.stream, flush=True)

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


@dataclass(frozen=True)
class Row:
    variant: str
    file: str
    size_bytes: int
    min_cosine: float | None
    mean_cosine: float | None
    max_abs_diff: float | None
    gate: float
    status: str  # "pass", "FAIL", "not validated: ..."
    spearman_ratio: float | None = None  # with --validate-with
    kendall_min: float | None = None  # rerankers: worst probe query's Kendall tau to the reference order
    top3: float | None = None  # rerankers: mean top-3 overlap with the reference
    sigmoid_error: float | None = None  # rerankers: largest sigmoid-score difference


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    if any(r.kendall_min is not None for r in rows):
        return _ranking_table(rows)
    lines = [
        "| variant | file | size (MB) | min cosine | mean cosine | max abs diff | gate | Spearman / ref | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.file} | {r.size_bytes / 1e6:.1f} | {_fmt(r.min_cosine, '.6f')} | "
            f"{_fmt(r.mean_cosine, '.6f')} | {_fmt(r.max_abs_diff, '.2e')} | >= {r.gate} | "
            f"{_fmt(r.spearman_ratio, '.4f')} | {r.status} |"
        )
    return "\n".join(lines)


def _ranking_table(rows: list[Row]) -> str:
    lines = [
        "| variant | file | size (MB) | max logit diff | min Kendall tau | top-3 overlap | max sigmoid err | "
        "Spearman / ref | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.file} | {r.size_bytes / 1e6:.1f} | {_fmt(r.max_abs_diff, '.2e')} | "
            f"{_fmt(r.kendall_min, '.4f')} | {_fmt(r.top3, '.3f')} | {_fmt(r.sigmoid_error, '.4f')} | "
            f"{_fmt(r.spearman_ratio, '.4f')} | {r.status} |"
        )
    return "\n".join(lines)
