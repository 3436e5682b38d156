"""Resume: the input cut into fixed row ranges (shards), one output file per shard written atomically, and a
state file that a rerun must match. A rerun with the same arguments embeds only the shards with no file;
every input row lands in exactly one shard, so every id comes out once.

Ray Data's own checkpointing (``DataContext.checkpoint_config``, beta in Ray 2.60) filters input rows by an
id column at read time: it cannot serve inputs without an id column (the row position is the id here), is
at-least-once for non-file sinks such as LanceDB, and knows nothing of the errors file or the model the
output was made with; hence this plan.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from ..manifest import Manifest
from .errors import OutputMismatchError
from .rows import as_text

STATE_NAME = "_bulk/state.json"
POS = "__pos"  # the row's position in the input
REASON = "__reason"  # why the row's text is not a text (null when it is one)
_PART = re.compile(r"^part-(\d{6})\.parquet$")


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def model_digest(manifest: Manifest, precision: str) -> str:
    """sha256 over what decides the vectors: the variant's files, the tokenizer and the pooling recipe."""
    variant = manifest.variants[precision]
    recipe = {
        "files": sorted((f.path, f.sha256) for f in variant.files),
        "tokenizer": manifest.tokenizer.sha256,
        "pooling": manifest.pooling,
        "normalize": manifest.normalize,
        "max_length": manifest.max_length,
        "query_instruction": manifest.query_instruction,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temp file beside ``path`` and rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(work_dir: Path) -> int:
    """Delete the temp files of writes a killed run never finished (``write_atomic`` names them
    ``.NAME.*.tmp``); call it before any actor of this run writes. Returns how many were removed."""
    if not work_dir.is_dir():
        return 0
    stale = [*work_dir.glob(".part-*.tmp"), *(work_dir / "_bulk").rglob(".*.tmp")]
    stale = [p for p in stale if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def load_state(work_dir: Path) -> dict[str, Any] | None:
    """The state a previous run of this output recorded, or None for a new output (refusing a directory
    that holds parts but no state: not ours)."""
    path = work_dir / STATE_NAME
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    stray = [p.name for p in work_dir.glob("part-*.parquet")] if work_dir.is_dir() else []
    if stray:
        raise OutputMismatchError(
            f"{work_dir} holds Parquet parts but no {STATE_NAME}: not an output of runtime.bulk; "
            "choose an empty or new output directory"
        )
    return None


def check_model(work_dir: Path, old: dict[str, Any] | None, state: dict[str, Any]) -> None:
    """Refuse, before anything is read, to add vectors of another model or precision to an output."""
    if old is None:
        return
    for key in ("model_digest", "precision"):
        if old.get(key) != state[key]:
            raise OutputMismatchError(
                f"{work_dir} holds vectors of model {old.get('model')} ({old.get('precision')}, digest "
                f"{str(old.get('model_digest'))[:12]}), this run embeds with {state['model']} ({state['precision']}, "
                f"digest {state['model_digest'][:12]}); refusing to mix them: write to a new output, or delete "
                f"{work_dir} to start over"
            )


def check_state(work_dir: Path, old: dict[str, Any] | None, state: dict[str, Any]) -> None:
    """Record ``state`` for a new output, or refuse one that was made with a different model, input or
    arguments."""
    if old is None:
        write_atomic(work_dir / STATE_NAME, json.dumps(state, indent=2).encode())
        return
    check_model(work_dir, old, state)
    changed = [k for k in state if k not in ("model", "created") and old.get(k) != state[k]]
    if changed:
        raise OutputMismatchError(
            f"{work_dir} was started with different {', '.join(changed)} (was {[old.get(k) for k in changed]}, "
            f"now {[state[k] for k in changed]}); resume with the same input and arguments, or write to a new output"
        )


def finished_shards(work_dir: Path) -> set[int]:
    """Shards whose part file exists (it appears only complete: written under a temp name, then renamed)."""
    if not work_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in work_dir.iterdir() if (m := _PART.match(p.name))}


def _uniform(chunks: list[pa.ChunkedArray]) -> pa.ChunkedArray | pa.Array:
    """One column from several blocks; Ray types a column of mixed Python values per block (e.g. a JSON
    field that is a string in one row and a number in another), so rebuild it from the values when the
    blocks disagree, and as strings when no other Arrow type holds them."""
    types = {c.type for c in chunks}
    if len(types) == 1 and not isinstance(next(iter(types)), pa.ExtensionType):
        return pa.chunked_array([ch for c in chunks for ch in c.chunks], next(iter(types)))
    values = [v for c in chunks for v in c.to_pylist()]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def cut_rows(blocks: list[pa.Table], first: int, start: int, stop: int, text_column: str) -> pa.Table:
    """Rows [start, stop) of the input from the blocks that hold them (the first starts at row ``first``).

    The text column becomes strings, and why a value is no text (null, a number, bad UTF-8) goes to
    ``REASON``: the actor reports it instead of failing, whatever type the reader gave the column."""
    n = stop - start
    offset = start - first
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in blocks[0].column_names:
        if name != text_column:
            columns[name] = _uniform([b.column(name) for b in blocks]).slice(offset, n)
    raw = [v for b in blocks for v in b.column(text_column).to_pylist()][offset : offset + n]
    texts, reasons = [], []
    for value in raw:
        text, reason = as_text(value)
        texts.append(text)
        reasons.append(reason)
    columns[text_column] = pa.array(texts, pa.string())
    columns[REASON] = pa.array(reasons, pa.string())
    columns[POS] = pa.array(range(start, stop), pa.int64())
    return pa.table(columns)


@dataclass
class ShardPlan:
    """The input, in order, cut into shards of ``shard_rows`` rows. It travels to every actor (the block
    references with it), and each actor cuts the shards it is given: no task per shard, and a shard
    reaches an actor whole whatever Ray Data does to blocks on the way."""

    total_rows: int
    shard_rows: int
    block_refs: list[ray.ObjectRef]
    block_starts: list[int]

    @property
    def n_shards(self) -> int:
        return -(-self.total_rows // self.shard_rows)

    def rows(self, shard: int, text_column: str) -> pa.Table:
        """Shard ``shard`` as one Arrow table, with each row's input position in ``POS``."""
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} is outside this plan's {self.n_shards} shards")
        start, stop = shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.total_rows)
        lo = bisect.bisect_right(self.block_starts, start) - 1
        hi = bisect.bisect_left(self.block_starts, stop) - 1
        # a reader may leave pandas blocks (select_columns on JSON does): Ray's accessor gives Arrow
        blocks = [BlockAccessor.for_block(b).to_arrow() for b in ray.get(self.block_refs[lo : hi + 1])]
        return cut_rows(blocks, self.block_starts[lo], start, stop, text_column)


@ray.remote(num_cpus=0)
def _num_rows(block: object) -> int:
    return BlockAccessor.for_block(block).num_rows()


def plan_shards(ds: ray.data.Dataset, shard_rows: int | Callable[[int], int]) -> ShardPlan:
    """Materialise the input (text, id and kept columns only) in input order and index its blocks by the
    row counts Ray Data already knows (a block without one is counted by a task). ``shard_rows``: rows
    per shard, or a function of the input's row count that picks it."""
    # A Dataset keeps the DataContext it was created with: order must be asked of that one, not the
    # global one (without it, blocks of one file come back in completion order and positions shift).
    ds.context.execution_options.preserve_order = True
    entries = [e for bundle in ds.materialize().iter_internal_ref_bundles() for e in bundle.blocks]
    counts = [e.metadata.num_rows for e in entries]
    unknown = [i for i, c in enumerate(counts) if c is None]
    for i, c in zip(unknown, ray.get([_num_rows.remote(entries[i].ref) for i in unknown])):
        counts[i] = c
    kept = [(e.ref, c) for e, c in zip(entries, counts) if c > 0]
    starts, total = [], 0
    for _, c in kept:
        starts.append(total)
        total += c
    rows = shard_rows(total) if callable(shard_rows) else shard_rows
    return ShardPlan(total, rows, [r for r, _ in kept], starts)
