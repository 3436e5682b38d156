"""The model alone under each worker layout: which K workers x T intra-op threads the server should run.

    python -m benchmarks.layout                          # bge-small-zh architecture, INT8, 36-token queries
    python -m benchmarks.layout --model-arch bge-large-zh --seconds 5

One onnxruntime session (weights loaded once), run in a loop from K threads at once, each run of ``n`` texts;
K x T from 1 x cores to cores x 1, spinning off and on. Reported per layout and batch size: texts/s, and the
median time of one run. The server's default layout and its batch policy come from this table
(``runtime/serve/config.py``); ``benchmarks.serve`` measures the same model-alone figure for the layout it
serves with, in the same run as the servers. Writes ``benchmarks/results/layout-<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .common import cpu_flags, run_threads, save

RESULTS = Path(__file__).resolve().parent / "results"
QUERY_TOKENS = 36


def model_alone(model_path: Path, workers: int, threads: int, spinning: bool, texts: int, seconds: float,
                length: int = QUERY_TOKENS, rows: Sequence[list[int]] | None = None, pad_id: int = 0) -> dict:
    """Texts/s of ``workers`` threads running one session (``threads`` intra-op threads) back to back.

    Without ``rows`` every run is ``texts`` texts of ``length`` tokens. With ``rows`` (token ids of real texts)
    each run takes ``texts`` of them drawn at random and padded to the longest with ``pad_id`` (the server's own
    ``pad_batch``, as its batches are): a workload's length spread (padding included) costs more than its median
    length does."""
    from runtime.batching import pad_batch
    from runtime.providers import create_session

    session = create_session(model_path, "cpu", threads, spinning=spinning)
    names = {i.name for i in session.get_inputs()}
    if rows is None:
        ids = np.full((texts, length), 1000, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        batches = [(ids, np.ones_like(ids))]
    else:
        rng = np.random.default_rng(0)
        batches = [pad_batch([rows[i] for i in rng.integers(0, len(rows), texts)], pad_id) for _ in range(512)]
    feeds = []
    for ids, mask in batches:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds.append({k: v for k, v in feed.items() if k in names})
    for feed in feeds[:3]:
        session.run(None, feed)
    runs: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def loop(first: int) -> None:
        mine = []
        i = first
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            session.run(None, feeds[i % len(feeds)])
            mine.append(time.perf_counter() - t0)
            i += 1
        with lock:
            runs.extend(mine)

    wall = run_threads(loop, [(k * len(feeds) // workers,) for k in range(workers)])
    out = {"workers": workers, "threads": threads, "spinning": spinning, "texts": texts,
           "texts_per_s": len(runs) * texts / wall, "run_ms_p50": float(np.median(runs) * 1000)}
    if rows is not None:
        out["mean_padded_tokens"] = float(np.mean([ids.shape[1] for ids, _ in batches]))
    return out


def layouts(cores: int) -> list[tuple[int, int, bool]]:
    out = [(1, cores, False), (1, cores, True)]
    k = 2
    while k <= cores:
        out += [(k, cores // k, False), (k, cores, False)]
        k *= 2
    if (cores, 1, False) not in out:
        out.append((cores, 1, False))
    return list(dict.fromkeys(out))


def report(result: dict) -> str:
    sizes = result["batch_sizes"]
    lines = [f"# Model alone by worker layout ({result['arch']}, INT8, {QUERY_TOKENS}-token texts)", "",
             f"{result['date']}, {result['cores']} cores usable, flags {result['cpu_flags']}, {result['seconds']:g} s "
             "per point; K workers run one session at once, each with T intra-op threads. texts/s (median ms per "
             "run).", "",
             "| layout (K x T, spinning) | " + " | ".join(f"{n} per run" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for entry in result["rows"]:
        cells = [f"{c['texts_per_s']:.0f} ({c['run_ms_p50']:.1f})" for c in entry["cells"]]
        lines.append(f"| {entry['workers']} x {entry['threads']}{', spin' if entry['spinning'] else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import datetime as dt

    from .serve import prepare_files
    from runtime.providers import usable_cores

    p = argparse.ArgumentParser(prog="python -m benchmarks.layout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-arch", default="bge-small-zh", choices=["bge-small-zh", "bge-large-zh", "tiny-zh"])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    files = prepare_files(args.model_arch)
    model = files["artifact"] / "model_int8.onnx"
    cores = usable_cores()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = []
    for k, t, spin in layouts(cores):
        cells = [model_alone(model, k, t, spin, n, args.seconds) for n in sizes]
        rows.append({"workers": k, "threads": t, "spinning": spin, "cells": cells})
        print(f"{k} x {t}{' spin' if spin else ''}: " + ", ".join(f"{c['texts']}: {c['texts_per_s']:.0f}/s "
              f"({c['run_ms_p50']:.1f} ms)" for c in cells), flush=True)
    result = {"arch": args.model_arch, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "cores": cores, "cpu_flags": cpu_flags(), "seconds": args.seconds, "batch_sizes": sizes,
              "rows": rows}
    text = report(result)
    save(args.out, f"layout-{args.model_arch}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
