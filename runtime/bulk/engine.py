"""The Ray Data side: a callable class that loads one ``Embedder`` per actor, for ``map_batches``.

``embed_dataset`` adds an ``embedding`` column to any dataset (for users' own pipelines); the command
line uses ``ShardWriter``, which embeds one whole shard per call and writes it atomically from the actor,
so a killed job leaves only complete shards behind.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ..embedder import Embedder
from .resume import POS, REASON, ShardPlan
from .rows import embed_rows
from .sinks import multivector_array, sparse_arrays, vector_array, write_shard

# A dead actor is restarted and its in-flight batches resent: Ray Data's actor pools default to
# max_restarts=-1 and max_task_retries=-1 (Ray 2.60), so a lost worker costs time, not rows.


def _load(model_dir: str, device: str, precision: str, threads: int) -> Embedder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is counted by the caller, not warned per batch
        return Embedder(model_dir, device=device, precision=precision, threads=threads)


class EmbedBatch:
    """``map_batches`` UDF: adds ``embedding`` (fixed-size list of float32, null for a bad row) and
    ``embedding_error`` (null, or why the row could not be embedded)."""

    def __init__(self, model_dir: str, text_column: str, *, device: str = "cpu", precision: str = "auto",
                 threads: int = 1, batch_size: int | None = None, query: bool = False, truncate: bool = True,
                 output_column: str = "embedding", long_text: str | None = None) -> None:
        if long_text == "chunks":
            raise ValueError("embed_dataset gives one vector per row: use long_text='chunk' (pooled windows), or "
                             "Embedder.embed_chunks for one row per window")
        self.emb = _load(model_dir, device, precision, threads)
        self.text_column, self.batch_size, self.query, self.truncate = text_column, batch_size, query, truncate
        self.long_text = long_text
        self.output_column = output_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = embed_rows(self.emb, batch.column(self.text_column).to_pylist(), query=self.query,
                         truncate=self.truncate, batch_size=self.batch_size, long_text=self.long_text)
        full = np.zeros((batch.num_rows, self.emb.dim), np.float32)
        full[res.ok] = res.vectors
        vectors = vector_array(full)
        if not res.ok.all():
            vectors = pa.FixedSizeListArray.from_arrays(vectors.values, self.emb.dim, mask=pa.array(~res.ok))
        batch = batch.append_column(self.output_column, vectors)
        return batch.append_column(f"{self.output_column}_error", pa.array(res.reasons, pa.string()))


SHARD = "shard"  # the one column of the command line's dataset: which shards to embed


class ShardWriter:
    """``map_batches`` UDF of the command line: its input rows are shard numbers; for each, cut the shard
    from the planned input, embed it, write its part file and errors, and return one summary row."""

    def __init__(self, model_dir: str, plan: ShardPlan, text_column: str, id_column: str | None, keep: list[str],
                 work_dir: str, meta: dict[bytes, bytes], *, device: str, precision: str, threads: int,
                 batch_size: int | None, query: bool, truncate: bool, crash_once_marker: str | None = None,
                 long_text: str | None = None, outputs: tuple[str, ...] = ("dense",)) -> None:
        self.emb = _load(model_dir, device, precision, threads)
        self.plan = plan
        self.text_column, self.id_column, self.keep = text_column, id_column, keep
        self.work_dir, self.meta = Path(work_dir), meta
        self.batch_size, self.query, self.truncate = batch_size, query, truncate
        self.long_text = long_text
        self.outputs = outputs
        self.crash_once_marker = crash_once_marker

    def _maybe_crash(self) -> None:
        """Test hook: die (as a lost node would) the first time only, across restarts."""
        if self.crash_once_marker is None:
            return
        try:
            fd = os.open(self.crash_once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        for shard in batch.column(SHARD).to_pylist():
            rows = self.plan.rows(shard, self.text_column)
            self._maybe_crash()
            summaries.append(self._shard(shard, rows))
        return pa.Table.from_pylist(summaries)

    def _shard(self, shard: int, rows: pa.Table) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = embed_rows(self.emb, rows.column(self.text_column).to_pylist(), query=self.query,
                         truncate=self.truncate, batch_size=self.batch_size, long_text=self.long_text,
                         heads="sparse" in self.outputs or "colbert" in self.outputs)
        for i, reason in enumerate(rows.column(REASON).to_pylist()):
            if reason is not None:
                res.reasons[i] = reason  # more precise than "null": what the input really held
        ids = rows.column(self.id_column) if self.id_column else rows.column(POS)
        if res.windows is not None:  # chunks: one output row per window, with its parent's id and its span
            take = pa.array([w[0] for w in res.windows], pa.int64())
            columns = {self.id_column or "id": ids.take(take)}
            for name in self.keep:
                columns[name] = rows.column(name).take(take)
            columns["window"] = pa.array([w[1] for w in res.windows], pa.int32())
            columns["span_start"] = pa.array([w[2] for w in res.windows], pa.int64())
            columns["span_end"] = pa.array([w[3] for w in res.windows], pa.int64())
        else:
            ok = pa.array(res.ok)
            columns = {self.id_column or "id": ids.filter(ok)}
            for name in self.keep:
                columns[name] = rows.column(name).filter(ok)
        if "dense" in self.outputs:
            columns["embedding"] = vector_array(res.vectors.reshape(-1, self.emb.dim))
        if "sparse" in self.outputs:
            columns["sparse_indices"], columns["sparse_values"] = sparse_arrays(res.lexical or [])
        if "colbert" in self.outputs:
            columns["colbert"] = multivector_array(res.colbert or [], self.emb.manifest.m3.colbert_dim)  # type: ignore[union-attr]
        table = pa.table(columns).replace_schema_metadata(self.meta)
        id_values = ids.to_pylist()
        errors = [
            {"id": id_values[i], "position": rows.column(POS)[i].as_py(), "reason": r}
            for i, r in enumerate(res.reasons) if r is not None
        ]
        write_shard(self.work_dir, shard, table, errors)
        return {"shard": shard, "rows": int(res.ok.sum()), "windows": table.num_rows, "failed": len(errors),
                "tokens": res.tokens,
                "truncated": res.truncated, "seconds": time.perf_counter() - t0}


def embed_dataset(
    ds: ray.data.Dataset,
    model_dir: str | Path,
    text_column: str,
    *,
    input_type: str = "document",
    actors: int = 1,
    threads_per_actor: int = 1,
    batch_size: int | None = None,
    rows_per_call: int = 1024,
    device: str = "cpu",
    precision: str = "auto",
    truncate: bool = True,
    output_column: str = "embedding",
    long_text: str | None = None,
) -> ray.data.Dataset:
    """``ds`` with ``output_column`` (fixed-size list of float32, each row equal to ``Embedder.embed`` of its
    text) and ``<output_column>_error`` (null, or why that row's embedding is null): a bad row never
    fails the pipeline. ``input_type='query'`` prepends the model's query instruction. Lazy, like any
    Ray Data transform."""
    from .errors import BulkConfigError

    if input_type not in ("document", "query"):
        raise BulkConfigError(f"input_type must be 'document' or 'query', got {input_type!r}")
    if actors < 1 or threads_per_actor < 1 or rows_per_call < 1:
        raise BulkConfigError("actors, threads_per_actor and rows_per_call must be >= 1")
    return ds.map_batches(
        EmbedBatch,
        fn_constructor_args=(str(model_dir), text_column),
        fn_constructor_kwargs={"device": device, "precision": precision, "threads": threads_per_actor,
                               "batch_size": batch_size, "query": input_type == "query", "truncate": truncate,
                               "output_column": output_column, "long_text": long_text},
        batch_size=rows_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor,
        num_gpus=1 if device == "cuda" else 0,
    )
