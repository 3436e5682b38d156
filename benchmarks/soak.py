"""Memory under load: embed thousands of batches of random lengths and watch RSS.

    python -m benchmarks.soak ARTIFACT_DIR [--batches 5000] [--precision int8] [--max-batch 4]

Prints RSS over time and the growth after warm-up; writes JSON with --json. Exits 1 if RSS grew more than
--max-growth (default 10%) between the end of warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@dataclass
class SoakResult:
    batches: int
    texts: int
    tokens: int
    seconds: float
    rss_start_mb: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    growth_after_warmup: float
    samples: list[tuple[int, float]]


def soak(
    artifact: Path,
    batches: int = 5000,
    precision: str = "auto",
    max_batch: int = 4,
    max_tokens: int = 512,
    warmup_fraction: float = 0.1,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> SoakResult:
    from runtime import Embedder

    emb = Embedder(artifact, device="cpu", precision=precision, threads=threads)
    rng = np.random.default_rng(seed)
    start_rss = rss_mb()
    samples: list[tuple[int, float]] = [(0, start_rss)]
    warmup = max(1, int(batches * warmup_fraction))
    every = max(1, batches // 50)
    n_texts = n_tokens = 0
    peak = start_rss
    t0 = time.perf_counter()
    after_warmup = start_rss
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lengths up to max_tokens chars may be truncated
        for b in range(1, batches + 1):
            k = int(rng.integers(1, max_batch + 1))
            lengths = rng.integers(1, max_tokens - 1, size=k)  # CJK characters: one token each, + [CLS] [SEP]
            texts = ["".join(chr(int(c)) for c in rng.integers(0x4E00, 0x4E00 + 6000, size=int(n))) for n in lengths]
            emb.embed(texts, batch_size=max_batch)
            n_texts += k
            n_tokens += int(lengths.sum()) + 2 * k
            if b % every == 0 or b == warmup:
                r = rss_mb()
                peak = max(peak, r)
                samples.append((b, r))
                if b == warmup:
                    after_warmup = r
                if progress:
                    print(f"  batch {b:>6}/{batches}  rss {r:8.1f} MB  {time.perf_counter() - t0:7.1f}s", file=sys.stderr, flush=True)
    end = rss_mb()
    return SoakResult(
        batches=batches,
        texts=n_texts,
        tokens=n_tokens,
        seconds=time.perf_counter() - t0,
        rss_start_mb=start_rss,
        rss_after_warmup_mb=after_warmup,
        rss_end_mb=end,
        rss_peak_mb=max(peak, end),
        growth_after_warmup=(end - after_warmup) / after_warmup,
        samples=samples,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--batches", type=int, default=5000)
    p.add_argument("--precision", default="auto")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-growth", type=float, default=0.10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    r = soak(args.artifact, args.batches, args.precision, args.max_batch, threads=args.threads)
    print("| batches | texts | tokens | seconds | RSS start | after warm-up | end | peak | growth after warm-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r.batches} | {r.texts} | {r.tokens} | {r.seconds:.0f} | {r.rss_start_mb:.0f} MB | "
        f"{r.rss_after_warmup_mb:.0f} MB | {r.rss_end_mb:.0f} MB | {r.rss_peak_mb:.0f} MB | {100 * r.growth_after_warmup:+.1f}% |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(r), indent=2))
    if r.growth_after_warmup > args.max_growth:
        print(f"FAIL: RSS grew {100 * r.growth_after_warmup:.1f}% after warm-up (limit {100 * args.max_growth:.0f}%)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
