"""What one bulk run is asked to do: the options of ``python -m runtime.bulk`` as a frozen dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BulkConfigError

LANCE_SCHEME = "lancedb://"
INPUT_TYPES = ("document", "query")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Sink:
    """Where vectors go: a directory of Parquet files, or a LanceDB table (``db`` directory + ``table``)."""

    kind: str  # "parquet" | "lancedb"
    path: Path  # the Parquet directory, or the LanceDB database directory
    table: str | None = None

    @property
    def work_dir(self) -> Path:
        """Shards, state and errors of the run; for LanceDB, inside the database directory."""
        if self.kind == "parquet":
            return self.path
        return self.path / "_bulk" / str(self.table)

    @property
    def errors_path(self) -> Path:
        """``errors.jsonl`` under ``_bulk/``: Parquet readers skip ``_``-prefixed paths, so
        ``pandas.read_parquet(output_dir)`` still reads the vectors when some rows failed."""
        if self.kind == "parquet":
            return self.path / "_bulk" / "errors.jsonl"
        return self.work_dir / "errors.jsonl"


def parse_sink(spec: str) -> Sink:
    """``lancedb://PATH/TABLE`` is a LanceDB table; anything else is a Parquet output directory."""
    if spec.startswith(LANCE_SCHEME):
        rest = spec[len(LANCE_SCHEME):].rstrip("/")
        db, _, table = rest.rpartition("/")
        if not db or not table:
            raise BulkConfigError(
                f"LanceDB sink {spec!r} needs a database directory and a table: lancedb://PATH/TABLE, "
                "e.g. lancedb://./index/passages"
            )
        return Sink("lancedb", Path(db), table)
    if "://" in spec:
        raise BulkConfigError(
            f"output {spec!r}: only local (or network-mounted) directories and lancedb://PATH/TABLE are "
            "supported; mount the bucket or write locally and copy"
        )
    return Sink("parquet", Path(spec))


OUTPUTS = ("dense", "sparse", "colbert")


@dataclass(frozen=True)
class BulkOptions:
    """One run. ``actors``/``threads_per_actor`` None: fill the machine (actors x threads <= CPUs)."""

    input: str
    output: str
    model_dir: Path
    text_column: str = "text"
    id_column: str | None = None
    keep: tuple[str, ...] = ()
    input_type: str = "document"
    actors: int | None = None
    threads_per_actor: int | None = None
    batch_size: int | None = None
    shard_rows: int | None = None  # None: ``auto_shard_rows`` (a resumed run keeps the size it started with)
    ray_address: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    truncate: bool = True
    long_text: str | None = None  # truncate | error | chunk | chunks; None: ``truncate`` decides
    progress: bool = True
    # which outputs each row gets: "dense" (column ``embedding``), and for bge-m3 artifacts "sparse" (columns
    # ``sparse_indices`` int32 list + ``sparse_values`` float32 list) and "colbert" (column ``colbert``: a list of
    # fixed-size float32 vectors, LanceDB's multivector form)
    outputs: tuple[str, ...] = ("dense",)
    # test hook: the first actor call that finds this file absent creates it and kills its own process
    crash_once_marker: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.input_type not in INPUT_TYPES:
            raise BulkConfigError(f"input_type must be one of {INPUT_TYPES}, got {self.input_type!r}")
        if self.device not in DEVICES:
            raise BulkConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("actors", "threads_per_actor", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BulkConfigError(f"{name} must be >= 1, got {value}")
        if self.long_text not in (None, "truncate", "error", "chunk", "chunks"):
            raise BulkConfigError(f"long_text must be truncate, error, chunk or chunks, got {self.long_text!r}")
        if self.long_text in ("truncate", "chunk", "chunks") and not self.truncate:
            raise BulkConfigError(f"--no-truncate contradicts --long-text {self.long_text}; pass one of them")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise BulkConfigError(f"shard_rows must be >= 1, got {self.shard_rows}")
        if {"embedding", "window", "span_start", "span_end"} & set(self.keep) or (self.id_column is None and "id" in self.keep):
            raise BulkConfigError(
                "--keep cannot name 'embedding', 'window', 'span_start', 'span_end' (or 'id' without --id-column): "
                "those output columns are written by the run; rename the input column"
            )
        if not Path(self.model_dir, "manifest.json").is_file():
            raise BulkConfigError(
                f"--model {self.model_dir} is not an artifact directory (no manifest.json); export one with "
                "`python -m export --out DIR`"
            )
        unknown = set(self.outputs) - set(OUTPUTS)
        if not self.outputs or unknown or len(set(self.outputs)) != len(self.outputs):
            raise BulkConfigError(f"--outputs must name some of {', '.join(OUTPUTS)} once each, got {','.join(self.outputs)}")
        if self.heads:
            if self.long_text_mode in ("chunk", "chunks"):
                raise BulkConfigError("--outputs sparse/colbert take --long-text truncate or error: chunk windows pool "
                                      "dense vectors only")
            if "m3" not in json.loads(Path(self.model_dir, "manifest.json").read_text(encoding="utf-8")):
                raise BulkConfigError(f"--model {self.model_dir} has no sparse or ColBERT outputs: only bge-m3 "
                                      "exports have them; use --outputs dense")
            taken = {"sparse_indices", "sparse_values", "colbert"} & set(self.keep)
            if taken:
                raise BulkConfigError(f"--keep cannot name {sorted(taken)}: the run writes those columns")

    @property
    def heads(self) -> bool:
        """Whether bge-m3's sparse or ColBERT outputs are asked for."""
        return bool({"sparse", "colbert"} & set(self.outputs))

    @property
    def long_text_mode(self) -> str:
        return self.long_text or ("truncate" if self.truncate else "error")

    @property
    def sink(self) -> Sink:
        return parse_sink(self.output)


def plan_actors(cpus: int, gpus: int, device: str, actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, threads per actor). CPU: one actor per 4 cores by default, never more threads than cores;
    CUDA: one actor per GPU, each with one CPU thread for tokenisation and feeding."""
    if device == "cuda":
        n = actors or max(1, gpus)
        return n, threads or 1
    cpus = max(1, cpus)
    if threads is None:
        threads = max(1, min(4, cpus // (actors or 1))) if actors else min(4, cpus)
    if actors is None:
        actors = max(1, cpus // threads)
    if actors * threads > cpus:
        # Ray reserves `threads` CPUs per actor: the pool would wait forever for CPUs that do not exist
        raise BulkConfigError(
            f"{actors} actors x {threads} threads need {actors * threads} CPUs, the Ray cluster has {cpus}; "
            "lower --actors or --threads-per-actor (or add nodes)"
        )
    return actors, threads


MAX_SHARD_ROWS = 4096  # a kill loses at most this many rows per actor; big enough to batch by length well
MIN_SHARD_ROWS = 256
SHARDS_PER_ACTOR = 4


def auto_shard_rows(total_rows: int, actors: int) -> int:
    """Rows per shard when the user gives none: at least ``SHARDS_PER_ACTOR`` shards per actor (so the
    last shards do not leave actors idle), at most ``MAX_SHARD_ROWS``, and not so few rows that a shard
    cannot be batched by length (1000-row shards cost 4-9% over one sorted call on bge-small-zh; 4096, 0-2%)."""
    per = -(-max(total_rows, 1) // (SHARDS_PER_ACTOR * max(actors, 1)))
    return max(MIN_SHARD_ROWS, min(MAX_SHARD_ROWS, per))
