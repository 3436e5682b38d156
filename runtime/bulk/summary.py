"""What a run did, in one line a user can paste: rows, rates, truncated and failed rows, wall time."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BulkSummary:
    """Counts are of this run (shards finished earlier are in ``skipped_shards`` and ``total_rows``)."""

    output: str
    total_rows: int  # rows in the input
    shards: int
    skipped_shards: int  # already done by an earlier run
    rows: int  # embedded in this run
    failed: int  # bad rows of this run (all runs' are in the errors file)
    errors_total: int  # lines in errors.jsonl
    tokens: int
    truncated: int
    wall_s: float
    embed_s: float  # from the first shard dispatched to the last written (no Ray start, no read)
    actor_busy_s: float  # summed over actors: time inside shard calls (embedding + writing)
    actors: int
    threads_per_actor: int
    precision: str
    errors_path: str | None
    long_text: str = "truncate"  # truncate | error | chunk | chunks; with chunk(s), ``truncated`` counts cut rows
    windows: int = 0  # output rows written (chunks: one per window; otherwise equal to ``rows``)
    shard_rows: int = 0  # rows per shard (the last may hold fewer)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rows_per_s": self.rows_per_s, "tokens_per_s": self.tokens_per_s}

    def line(self) -> str:
        resumed = f", {self.skipped_shards} of {self.shards} shards already done" if self.skipped_shards else ""
        shards = f"{self.shards} shards of {self.shard_rows} rows"
        errors = f"; errors in {self.errors_path}" if self.errors_path else ""
        return (
            f"embedded {self.rows} rows ({self.total_rows} in the input{resumed}) in {self.wall_s:.1f} s: "
            f"{self.rows_per_s:.1f} rows/s, {self.tokens_per_s:.0f} tokens/s; {self.truncated} "
            f"{'truncated' if self.long_text in ('truncate', 'error') else 'cut into windows'}"
            f"{f' ({self.windows} window rows)' if self.long_text == 'chunks' else ''}, "
            f"{self.failed} failed; {self.actors} actors x {self.threads_per_actor} threads, {shards}, {self.precision}"
            f"{errors}"
        )
