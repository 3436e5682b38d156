"""Bulk embedding on Ray Data: a corpus file in, vectors out in Parquet or a LanceDB table, resumable.

Needs the ``bulk`` extra (``pip install -e ".[cpu,bulk]"``); ``import runtime`` never imports this package
(nor Ray, pyarrow or lancedb).
"""

from importlib.util import find_spec

_missing = [m for m in ("ray", "pyarrow", "lancedb") if find_spec(m) is None]
if _missing:
    raise ImportError(
        f"bulk embedding needs the `bulk` extra ({', '.join(_missing)} not installed): "
        "pip install -e '.[cpu,bulk]'"
    )

from .engine import EmbedBatch, embed_dataset  # noqa: E402
from .errors import BulkConfigError, BulkError, OutputMismatchError  # noqa: E402
from .options import BulkOptions, Sink, parse_sink  # noqa: E402
from .run import run_bulk  # noqa: E402
from .summary import BulkSummary  # noqa: E402

__all__ = [
    "BulkConfigError",
    "BulkError",
    "BulkOptions",
    "BulkSummary",
    "EmbedBatch",
    "OutputMismatchError",
    "Sink",
    "embed_dataset",
    "parse_sink",
    "run_bulk",
]
