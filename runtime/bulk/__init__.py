"""Bulk embedding on Ray Data: a corpus file in, vectors out in Parquet or a LanceDB table, resumable.

Needs the ``bulk`` extra (``pip install -e ".[cpu,bulk]"``); ``import runtime`` never imports this package
(nor Ray, pyarrow or lancedb).
"""

from .engine import EmbedBatch, embed_dataset
from .errors import BulkConfigError, BulkError, OutputMismatchError, ShardSplitError
from .options import BulkOptions, Sink, parse_sink
from .run import run_bulk
from .summary import BulkSummary

__all__ = [
    "BulkConfigError",
    "BulkError",
    "BulkOptions",
    "BulkSummary",
    "EmbedBatch",
    "OutputMismatchError",
    "ShardSplitError",
    "Sink",
    "embed_dataset",
    "parse_sink",
    "run_bulk",
]
