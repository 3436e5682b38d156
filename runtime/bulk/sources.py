"""Find the input files and read them with Ray Data's readers, in a fixed order (so row positions, and
the shards cut from them, are the same in every run)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import ray

from .errors import BulkConfigError

FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    return FORMATS.get(Path(name).suffix)


def list_inputs(spec: str) -> tuple[list[Path], str]:
    """(sorted files, format) of one file, a directory (its files of one known format) or a glob."""
    if any(c in spec for c in "*?["):
        candidates = [Path(p) for p in glob.glob(spec, recursive=True)]
    elif Path(spec).is_dir():
        candidates = [p for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith((".", "_"))]
    elif Path(spec).is_file():
        candidates = [Path(spec)]
    else:
        raise BulkConfigError(f"input {spec!r} is neither a file, a directory nor a glob that matches; check the path")
    files = sorted(p for p in candidates if p.is_file() and _format_of(p))
    if not files:
        raise BulkConfigError(
            f"input {spec!r} holds no .jsonl, .json, .parquet or .csv file; point at one file, a directory or a glob"
        )
    formats = {_format_of(p) for p in files}
    if len(formats) > 1:
        raise BulkConfigError(f"input {spec!r} mixes formats {sorted(formats)}; give one format per run (a glob helps)")
    return files, formats.pop()


def fingerprint(files: list[Path]) -> list[list[object]]:
    """Names and sizes: a resumed run must read the same input, or its row positions mean nothing."""
    return [[os.path.abspath(p), p.stat().st_size] for p in files]


def columns_of(path: Path, fmt: str) -> set[str]:
    """Column names from the first file's schema, header or first lines: a cheap check before Ray reads."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    if path.name.endswith((".zst", ".bz2")):
        return set()  # unknown: Ray's reader will say
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            import csv

            return set(next(csv.reader(f), []))
        names: set[str] = set()
        for _, line in zip(range(100), f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BulkConfigError(f"{path} is not JSON Lines ({exc}); fix the file or convert it") from exc
                if isinstance(row, dict):
                    names.update(row)
        return names


def read(files: list[Path], fmt: str, columns: list[str]) -> ray.data.Dataset:
    """Ray Data's reader for ``fmt`` over ``files``, cut to ``columns`` (missing ones are a config error)."""
    names = columns_of(files[0], fmt)
    missing = [c for c in columns if c not in names]
    if names and missing:
        raise BulkConfigError(
            f"{files[0]} has no column(s) {missing} (it has {sorted(names)}); check --text-column, --id-column "
            "and --keep"
        )
    paths = [str(p) for p in files]
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, columns=columns)
    elif fmt == "csv":
        ds = ray.data.read_csv(paths)
    else:
        ds = ray.data.read_json(paths, lines=True)
    return ds if fmt == "parquet" else ds.select_columns(columns)
