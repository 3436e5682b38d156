"""``python -m runtime.bulk INPUT OUTPUT --model DIR ...``: argument parsing only; the work is in run.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EmbedderError
from .options import BulkOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.bulk",
        description="Embed a corpus (JSON Lines, Parquet or CSV: a file, a directory or a glob) on Ray Data into "
        "a directory of Parquet files or a LanceDB table (lancedb://PATH/TABLE). Rerun with the same "
        "arguments to resume a killed run.",
    )
    p.add_argument("input")
    p.add_argument("output", help="a directory for Parquet files, or lancedb://PATH/TABLE")
    p.add_argument("--model", required=True, type=Path, help="artifact directory written by `python -m export`")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None, help="default: the row's position in the input, as column 'id'")
    p.add_argument("--keep", default="", help="comma-separated input columns to copy to the output")
    p.add_argument("--input-type", choices=("document", "query"), default="document")
    p.add_argument("--actors", type=int, default=None, help="default: fill the machine (actors x threads <= CPUs)")
    p.add_argument("--threads-per-actor", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="texts per model run (default: the Embedder's)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="rows per output file, the unit of resume (default: at least 4 shards per actor, at most "
                        "4096 rows; a resumed run keeps its first run's size)")
    p.add_argument("--ray-address", default=None, help="auto, ray://HOST:PORT, or none for a local Ray")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"), default="auto")
    p.add_argument("--no-truncate", action="store_true", help="refuse (per row, into errors.jsonl) texts past max length")
    p.add_argument("--long-text", choices=("truncate", "error", "chunk", "chunks"), default=None,
                   help="a text past max length: truncate (default), error (= --no-truncate), chunk (windows "
                   "pooled into one vector, as Embedder.embed(long_text='chunk')), chunks (one output row per "
                   "window with its parent id, window index and character span)")
    p.add_argument("--outputs", default="dense",
                   help="comma-separated: dense (column embedding), and for bge-m3 artifacts sparse (sparse_indices, "
                        "sparse_values) and colbert (a list of vectors per row); default: %(default)s")
    p.add_argument("--no-progress", action="store_true", help="turn off Ray Data's progress bars")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--test-crash-once", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = BulkOptions(
            input=args.input, output=args.output, model_dir=args.model, text_column=args.text_column,
            id_column=args.id_column, keep=tuple(k for k in args.keep.split(",") if k), input_type=args.input_type,
            actors=args.actors, threads_per_actor=args.threads_per_actor, batch_size=args.batch_size,
            shard_rows=args.shard_rows, ray_address=args.ray_address, device=args.device, precision=args.precision,
            truncate=not args.no_truncate, long_text=args.long_text, progress=not args.no_progress,
            crash_once_marker=args.test_crash_once, outputs=tuple(o.strip() for o in args.outputs.split(",") if o.strip()),
        )
        from .run import run_bulk  # imports Ray: after the arguments are known to be sane

        summary = run_bulk(opts)
    except EmbedderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line(), file=sys.stderr)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0
