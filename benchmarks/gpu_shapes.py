"""What a new batch shape costs on its first run on onnxruntime's CUDA provider, and what removes it.

    python -m benchmarks.gpu_shapes --artifact DIR [--out DIR]        # on a GPU machine
    python -m benchmarks.gpu_shapes --artifact DIR --dry-run          # CPU rehearsal (tiny model)

A serving batcher forms batches of every size from 1 to its cap, at every padded length: far more shapes than
any warm-up can visit. The first GPU load run of runtime.serve (bge-large fp16, H200) logged its warm-up's
32 x 32-token batch at 93 ms, where a warm 64 x 128 batch takes 12 ms, and its p99 rose with every new rate
step. Each configuration below runs in its own process (no cache shared between them): one warm-up, then the
same seeded list of batch shapes, each run twice; the first run's excess over the second is what a request
meets when its batch has a shape the process has not run before.

- ``same-small``: the runtime's CUDA options (arena grows by exactly what a run asks), warm-up 1 x max_length
- ``same-largest``: the same options, warm-up at the largest batch the server forms (its token budget)
- ``pow2-small``: the arena grows by powers of two (onnxruntime's default), warm-up 1 x max_length
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import save

CONFIGS = ("same-small", "same-largest", "pow2-small")


def shapes(seed: int, count: int, max_rows: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(1, max_rows + 1)), int(8 * rng.integers(2, 17))) for _ in range(count)]


def one(artifact: Path, config: str, dry_run: bool, count: int) -> dict:
    import onnxruntime as ort

    from runtime import Embedder
    from runtime.providers import CPU, CUDA, cuda_options, disabled_optimizers, session_options

    device = "cpu" if dry_run else "cuda"
    emb = Embedder(artifact, device=device, precision="fp32" if dry_run else "fp16")
    model = artifact / emb.manifest.variants[emb.precision].model_file
    _, max_tokens, _ = emb.batch_limits
    length = emb.max_length
    del emb
    if dry_run:
        providers: list = [CPU]
    else:
        ort.preload_dlls()
        options = cuda_options(0)
        if config.startswith("pow2"):
            options["arena_extend_strategy"] = "kNextPowerOfTwo"
        providers = [(CUDA, options), CPU]
    sess = ort.InferenceSession(str(model), sess_options=session_options(None), providers=providers,
                                disabled_optimizers=disabled_optimizers(providers))
    out_name = sess.get_outputs()[0].name

    def run(n: int, t: int) -> float:
        ids = np.full((n, t), 1000, np.int64)
        ids[:, 0] = 101
        start = time.perf_counter()
        sess.run([out_name], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return time.perf_counter() - start

    warm = (max(1, min(128, max_tokens // length)), length) if config.endswith("largest") else (1, length)
    warm_s = [run(*warm), run(*warm)]
    rows = []
    for n, t in shapes(0, count, 4 if dry_run else 64):
        first, second = run(n, t), run(n, t)
        rows.append({"rows": n, "length": t, "first_ms": 1000 * first, "second_ms": 1000 * second})
    excess = np.array([r["first_ms"] - r["second_ms"] for r in rows])
    return {"config": config, "warm_up_shape": list(warm), "warm_up_ms": [1000 * s for s in warm_s],
            "shapes": len(rows), "first_minus_second_ms": {"median": float(np.median(excess)),
                                                           "p90": float(np.percentile(excess, 90)),
                                                           "max": float(excess.max())},
            "second_ms_median": float(np.median([r["second_ms"] for r in rows])), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_shapes", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--shapes", type=int, default=40)
    p.add_argument("--one", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.artifact, args.one, args.dry_run, args.shapes)))
        return 0
    results = []
    for config in CONFIGS:
        cmd = [sys.executable, "-m", "benchmarks.gpu_shapes", "--artifact", str(args.artifact), "--one", config,
               "--shapes", str(args.shapes)] + (["--dry-run"] if args.dry_run else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            results.append({"config": config, "error": proc.stderr[-800:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lines = ["| config | warm-up shape | first - second run, median / p90 / max (ms) | warm run median (ms) |",
             "|---|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][-200:]!r} | | |")
            continue
        e = r["first_minus_second_ms"]
        lines.append(f"| {r['config']} | {r['warm_up_shape'][0]} x {r['warm_up_shape'][1]} | "
                     f"{e['median']:.1f} / {e['p90']:.1f} / {e['max']:.1f} | {r['second_ms_median']:.1f} |")
    md = "\n".join(lines)
    print(md, flush=True)
    if args.out is not None:
        save(args.out, "gpu-shapes", {"configs": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
