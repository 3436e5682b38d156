"""One bulk run, start to end: read, plan shards, skip finished ones, embed the rest on an actor pool,
collect errors, load LanceDB if asked, summarise."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from functools import partial
from typing import Callable

import ray

from ..embedder import _AUTO_ORDER
from ..errors import ArtifactError
from ..manifest import Manifest
from .engine import SHARD, ShardWriter
from .options import BulkOptions, auto_shard_rows, plan_actors
from .resume import (check_model, check_state, finished_shards, load_state, model_digest, plan_shards,
                     remove_stale_temps, write_atomic)
from .sinks import collect_errors, load_lancedb, metadata
from .sources import fingerprint, list_inputs, read
from .summary import BulkSummary

WORKER_NICENESS = "RAY_worker_niceness"  # read by the raylet a local ray.init starts


def resolve_precision(manifest: Manifest, device: str, precision: str) -> str:
    """The variant the actors will load, decided on the driver (as ``Embedder`` decides it) so the output
    can be checked against it before any work starts."""
    if precision == "auto":
        for p in _AUTO_ORDER[device]:
            if p in manifest.variants:
                return p
    if precision not in manifest.variants:
        raise ArtifactError(
            f"the artifact has no {precision} variant (it has {sorted(manifest.variants)}); pick one of those"
        )
    return precision


def run_bulk(opts: BulkOptions) -> BulkSummary:
    """Run ``opts`` on the connected Ray cluster, or on a local one started here (and stopped after)."""
    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        if opts.ray_address is None:
            # Ray starts its workers at niceness 15 (to keep its own daemons responsive); in a local bulk run
            # the actors are the work, and at 15 the driver and Ray's daemons preempt them (measured on 2
            # cores: Ray's overhead over one Embedder.embed call 2.34 -> 1.97 at 0). An explicit setting wins.
            os.environ.setdefault(WORKER_NICENESS, "0")
        ray.init(address=opts.ray_address, include_dashboard=False)
        started = True
    try:
        return _run(opts, t0)
    finally:
        if started:
            ray.shutdown()


def _run(opts: BulkOptions, t0: float) -> BulkSummary:
    ray.data.DataContext.get_current().enable_progress_bars = opts.progress
    sink = opts.sink
    manifest = Manifest.load(opts.model_dir)
    precision = resolve_precision(manifest, opts.device, opts.precision)
    digest = model_digest(manifest, precision)
    files, fmt = list_inputs(opts.input)
    id_out = opts.id_column or "id"
    state = {
        "model": manifest.source.model, "model_digest": digest, "precision": precision,
        "dimension": manifest.dimension, "input": fingerprint(files), "format": fmt,
        "text_column": opts.text_column, "id_column": opts.id_column, "keep": list(opts.keep),
        "input_type": opts.input_type, "long_text": opts.long_text_mode, "outputs": list(opts.outputs),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    old = load_state(sink.work_dir)
    check_model(sink.work_dir, old, state)  # before reading a corpus that could take minutes
    meta = metadata({"model": manifest.source.model, "model_digest": digest, "precision": precision,
                     "dimension": manifest.dimension, "input_type": opts.input_type,
                     "outputs": ",".join(opts.outputs)})

    resources = ray.cluster_resources()
    actors, threads = plan_actors(int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), opts.device,
                                  opts.actors, opts.threads_per_actor)
    columns = list(dict.fromkeys([opts.text_column, *([opts.id_column] if opts.id_column else []), *opts.keep]))
    if opts.shard_rows is not None:
        shard_rows: int | Callable[[int], int] = opts.shard_rows
    elif old is not None and "shard_rows" in old:
        shard_rows = int(old["shard_rows"])  # resuming: the shards must be the ones the first run cut
    else:
        shard_rows = partial(auto_shard_rows, actors=actors)
    plan = plan_shards(read(files, fmt, columns), shard_rows)
    check_state(sink.work_dir, old, {**state, "shard_rows": plan.shard_rows})
    remove_stale_temps(sink.work_dir)  # a killed run's half-written parts: their shards are redone below
    done = finished_shards(sink.work_dir)
    todo = [k for k in range(plan.n_shards) if k not in done]
    totals = {"rows": 0, "windows": 0, "failed": 0, "tokens": 0, "truncated": 0, "seconds": 0.0}
    t_embed = time.perf_counter()
    if todo:
        # one block per shard number, so shards spread over the actors one at a time
        shards = ray.data.from_items([{SHARD: k} for k in todo], override_num_blocks=len(todo))
        out = shards.map_batches(
            ShardWriter,
            fn_constructor_args=(str(opts.model_dir), plan, opts.text_column, opts.id_column, list(opts.keep),
                                 str(sink.work_dir), meta),
            fn_constructor_kwargs={"device": opts.device, "precision": precision, "threads": threads,
                                   "batch_size": opts.batch_size, "query": opts.input_type == "query",
                                   "truncate": opts.truncate, "crash_once_marker": opts.crash_once_marker,
                                   "long_text": opts.long_text_mode, "outputs": opts.outputs},
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            num_gpus=1 if opts.device == "cuda" else 0,
            )
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key in totals:
                totals[key] += sum(batch.column(key).to_pylist())
    embed_s = time.perf_counter() - t_embed
    errors_total = collect_errors(sink)
    if sink.kind == "lancedb":
        marker = sink.work_dir / "_bulk" / "loaded.json"
        if todo or not marker.is_file():
            marker.unlink(missing_ok=True)
            added = load_lancedb(sink, id_out, meta)
            write_atomic(marker, json.dumps({"rows_added": added}).encode())
    return BulkSummary(
        output=opts.output, total_rows=plan.total_rows, shards=plan.n_shards, skipped_shards=plan.n_shards - len(todo),
        rows=totals["rows"], failed=totals["failed"], errors_total=errors_total, tokens=totals["tokens"],
        truncated=totals["truncated"], wall_s=time.perf_counter() - t0, embed_s=embed_s, actor_busy_s=totals["seconds"], actors=actors,
        threads_per_actor=threads, precision=precision,
        errors_path=str(sink.errors_path) if errors_total else None,
        long_text=opts.long_text_mode, windows=totals["windows"], shard_rows=plan.shard_rows,
    )
