"""Throughput of one shared Embedder under 1 and N caller threads, and whether the vectors stay the same.

    python -m benchmarks.concurrency ARTIFACT_DIR [--threads-list 1,4,16] [--precision int8]

Each caller embeds its own slice of the corpus (short and long Chinese texts) in batches; the table shows
total texts/s per caller count and the max abs difference to the single-caller vectors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import datasets
from .common import run_threads


def run(artifact: Path, callers: int, precision: str, texts: list[str], batch_size: int = 8) -> tuple[float, np.ndarray]:
    from runtime import Embedder

    emb = Embedder(artifact, device="cpu", precision=precision)
    emb.embed(texts[:8])
    slices = [list(range(i, len(texts), callers)) for i in range(callers)]
    out = np.zeros((len(texts), emb.dim), np.float32)
    errors: list[BaseException] = []

    def work(idx: list[int]) -> None:
        try:
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                out[chunk] = emb.embed([texts[i] for i in chunk], batch_size=batch_size)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    seconds = run_threads(work, [(s,) for s in slices])
    if errors:
        raise errors[0]
    return len(texts) / seconds, out


def main(argv: list[str] | None = None) -> int:
    import warnings

    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--threads-list", default="1,4,16")
    p.add_argument("--precision", default="int8")
    p.add_argument("--texts", type=int, default=320)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    texts = (datasets.sts_b_zh().first[: args.texts - 32] + datasets.sohu_long_documents()[:32])[: args.texts]
    print("| caller threads | texts/s | max abs diff to 1 caller |")
    print("|---:|---:|---:|")
    base = None
    for n in [int(x) for x in args.threads_list.split(",")]:
        rate, vecs = run(args.artifact, n, args.precision, texts)
        if base is None:
            base = vecs
        print(f"| {n} | {rate:.1f} | {np.abs(vecs - base).max():.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
