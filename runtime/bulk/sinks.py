"""Writing vectors: one Parquet file per shard (atomic), the errors file, and the LanceDB table.

The embedding column is a fixed-size list of float32 of the model's dimension, so DuckDB, LanceDB, pandas
and pgvector loaders read it as a vector without conversion; the model digest and precision go into the
Parquet schema metadata so a file says what made it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputMismatchError
from .options import Sink
from .resume import part_name, write_atomic

META_PREFIX = "bge_onnx."


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, dim) float32 -> Arrow fixed_size_list<float32>[dim] without a copy of the values."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def sparse_arrays(weights: list[dict[int, float]]) -> tuple[pa.ListArray, pa.ListArray]:
    """Lexical weights as two list columns, token ids (int32, ascending) and their weights (float32)."""
    ids = [sorted(w) for w in weights]
    return (pa.array(ids, pa.list_(pa.int32())),
            pa.array([[w[t] for t in row] for w, row in zip(weights, ids)], pa.list_(pa.float32())))


def multivector_array(matrices: list[np.ndarray], dim: int) -> pa.ListArray:
    """Per row a (tokens, dim) float32 matrix -> list<fixed_size_list<float32>[dim]> (LanceDB's multivector)."""
    flat = np.concatenate([np.ascontiguousarray(m, np.float32).reshape(-1) for m in matrices]) if matrices \
        else np.empty(0, np.float32)
    offsets = np.zeros(len(matrices) + 1, dtype=np.int32)
    np.cumsum([len(m) for m in matrices], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), dim))


def metadata(fields: dict[str, Any]) -> dict[bytes, bytes]:
    return {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in fields.items()}


def write_shard(work_dir: Path, shard: int, table: pa.Table, errors: list[dict[str, Any]]) -> None:
    """Errors first, then the part file: a part file exists only with its shard's errors beside it."""
    errors_path = work_dir / "_bulk" / "errors" / f"{shard:06d}.jsonl"
    write_atomic(errors_path, "".join(json.dumps(e, ensure_ascii=False, default=str) + "\n" for e in errors).encode())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(work_dir / part_name(shard), buf.getvalue())


def collect_errors(sink: Sink) -> int:
    """Concatenate the shards' error files (this run's and earlier runs') into ``errors.jsonl``; the count."""
    parts = sorted((sink.work_dir / "_bulk" / "errors").glob("*.jsonl"))
    chunks = [p.read_bytes() for p in parts]
    data = b"".join(chunks)
    n = data.count(b"\n")
    if n or sink.errors_path.exists():
        write_atomic(sink.errors_path, data)
    return n


def parts(sink: Sink) -> list[Path]:
    return sorted(sink.work_dir.glob("part-*.parquet"))


def load_lancedb(sink: Sink, id_column: str, meta: dict[bytes, bytes]) -> int:
    """Create the table from the shards, or add the rows whose id it lacks (idempotent: a load killed after
    its commit and rerun adds nothing twice). Refuses a table made with another model or precision."""
    import lancedb
    import pyarrow.dataset as pads

    files = [str(p) for p in parts(sink)]
    db = lancedb.connect(str(sink.path))
    source = pads.dataset(files, format="parquet")
    schema = source.schema.with_metadata(meta)
    reader = pa.RecordBatchReader.from_batches(schema, (b.replace_schema_metadata(meta) for b in source.to_batches()))
    if sink.table not in db.list_tables().tables:
        db.create_table(sink.table, data=reader, schema=schema)
        return source.count_rows()
    table = db.open_table(sink.table)
    have = {k: v for k, v in (table.schema.metadata or {}).items() if k.startswith(META_PREFIX.encode())}
    want = {k: v for k, v in meta.items() if k in (f"{META_PREFIX}model_digest".encode(), f"{META_PREFIX}precision".encode())}
    if any(have.get(k) != v for k, v in want.items()):
        raise OutputMismatchError(
            f"LanceDB table {sink.table!r} in {sink.path} holds vectors of another model or precision "
            f"({ {k.decode(): v.decode() for k, v in have.items()} }); write to a new table instead of mixing them"
        )
    before = table.count_rows()
    table.merge_insert(id_column).when_not_matched_insert_all().execute(reader)
    return table.count_rows() - before
