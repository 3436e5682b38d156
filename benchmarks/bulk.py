"""Bulk embedding on Ray Data against one ``Embedder.embed`` call, on the same texts and cores.

    python -m benchmarks.bulk --arch bge-small-zh --rows 20000
    python -m benchmarks.bulk --arch bge-large-zh --rows 20000

Texts: the STS-B zh sentences and the SOHU news passages (``benchmarks/data``), cycled up to ``--rows``.
INT8 artifact of the architecture with random weights (``benchmarks/results/cache/<arch>/artifact``, reused if
present, else exported as ``python -m export --model CKPT --out ART --precision int8``). Figures:

- (a) one ``Embedder.embed`` over the whole list, ``--threads`` intra-op threads (model already loaded),
  measured before and after (b), with no Ray running (the VM's speed drifts by up to 15% within minutes);
- (b) ``runtime.bulk`` with 1 actor x ``--threads`` threads; (c) ``--threads`` actors x 1 thread: each from a
  fresh output directory on a Ray already started (``ray.init`` is not counted; reading, planning, actor
  start and model load are), rates over the run's wall time and over its embedding phase; shard size as
  the command line picks it unless ``--shard-rows`` is given;
- Ray's overhead = rate(a) / rate(b), with (a) the mean of its two runs (target: <= 1.10);
- resume: a ``python -m runtime.bulk`` subprocess (config b) SIGKILLed once half its shards (rounded down)
  are written, then rerun; the rerun's wall time against the remaining rows at (b)'s rate (target: <= 1.10).

Writes ``benchmarks/results/bulk-<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import datasets
from .common import cpu_flags, cpu_name, save

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


def say(msg: str) -> None:
    print(f"[bulk] {msg}", file=sys.stderr, flush=True)


def prepare_artifact(arch: str) -> Path:
    """The serving/speed benchmarks' cached artifact if there is one, else an INT8 export of the same
    random checkpoint (built the same way: ``export.architectures.materialise``, seed 0)."""
    base = CACHE / arch
    artifact = base / "artifact"
    if (artifact / "manifest.json").is_file():
        return artifact
    ckpt = base / "checkpoint"
    if not (ckpt / "config.json").is_file():
        from export.architectures import materialise

        materialise(arch, ckpt, seed=0)
    from export.cli import main as export_main

    if export_main(["--model", str(ckpt), "--out", str(artifact), "--precision", "int8",
                    "--query-instruction", INSTRUCTION]) != 0:
        raise SystemExit(f"export of {arch} failed; see the table above")
    return artifact


def corpus(rows: int) -> list[str]:
    sts = datasets.sts_b_zh()
    pool = list(dict.fromkeys(sts.first + sts.second + datasets.sohu_passages()))
    return [pool[i % len(pool)] for i in range(rows)]


def write_corpus(texts: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")


def single_call(artifact: Path, texts: list[str], threads: int) -> tuple[dict, np.ndarray]:
    from runtime import Embedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = Embedder(artifact, device="cpu", precision="int8", threads=threads)
        tokens = int(sum(len(x) for x in emb.tokenize(texts).ids))
        t0 = time.perf_counter()
        vectors = emb.embed(texts)
        wall = time.perf_counter() - t0
    return {"rows": len(texts), "tokens": tokens, "wall_s": wall, "rows_per_s": len(texts) / wall,
            "tokens_per_s": tokens / wall}, vectors


def bulk(artifact: Path, src: Path, out: Path, actors: int, threads: int, shard_rows: int | None) -> dict:
    from runtime.bulk import BulkOptions, run_bulk

    shutil.rmtree(out, ignore_errors=True)
    opts = BulkOptions(input=str(src), output=str(out), model_dir=artifact, actors=actors, threads_per_actor=threads,
                       shard_rows=shard_rows, precision="int8", progress=False)
    s = run_bulk(opts)
    return {"actors": actors, "threads_per_actor": threads, "shard_rows": s.shard_rows, "shards": s.shards,
            "rows": s.rows, "tokens": s.tokens, "failed": s.failed,
            "truncated": s.truncated, "wall_s": s.wall_s, "embed_s": s.embed_s, "rows_per_s": s.rows / s.wall_s,
            "tokens_per_s": s.tokens / s.wall_s, "embed_rows_per_s": s.rows / s.embed_s}


def max_diff(out: Path, reference: np.ndarray) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    ids = np.asarray(table.column("id").to_pylist())
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return float(np.abs(got - reference[ids]).max())


def resume(artifact: Path, src: Path, out: Path, address: str, threads: int, shard_rows: int | None,
           rows: int) -> dict:
    from runtime.bulk.options import auto_shard_rows

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime.bulk", str(src), str(out), "--model", str(artifact), "--id-column", "id",
           "--actors", "1", "--threads-per-actor", str(threads), "--precision", "int8", "--ray-address", address,
           "--no-progress"]
    if shard_rows is not None:
        cmd += ["--shard-rows", str(shard_rows)]
    shards = -(-rows // (shard_rows or auto_shard_rows(rows, 1)))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while len(list(out.glob("part-*.parquet"))) < shards // 2:
        if proc.poll() is not None:
            raise SystemExit(f"the run to be killed exited ({proc.returncode}) before half its shards; rerun with more --rows")
        time.sleep(0.05)
    killed_after = time.perf_counter() - t0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.parquet")))
    t1 = time.perf_counter()
    rerun = subprocess.run(cmd + ["--summary-json", str(out.parent / "resume-summary.json")], cwd=ROOT,
                           capture_output=True, text=True)
    if rerun.returncode != 0:
        raise SystemExit(f"resume failed:\n{rerun.stderr[-3000:]}")
    wall = time.perf_counter() - t1
    summary = json.loads((out.parent / "resume-summary.json").read_text())
    return {"shards": shards, "done_at_kill": done, "killed_after_s": killed_after, "resume_wall_s": wall,
            "resumed_rows": summary["rows"], "resume_embed_s": summary["embed_s"]}


def markdown(r: dict) -> str:
    a, a2, b, c, res = r["single_call"], r["single_call_after"], r["bulk_1x"], r["bulk_nx1"], r["resume"]
    lines = [
        f"# Bulk embedding on Ray Data: {r['arch']} INT8, {r['rows']} texts",
        "",
        f"{r['cpu']}, {r['cpus']} CPUs, Ray {r['ray']}, onnxruntime {r['onnxruntime']}; texts: STS-B zh sentences "
        f"and SOHU news passages cycled ({r['unique_texts']} unique), {a['tokens']} tokens; CPU flags: {r['cpu_flags']}.",
        "",
        "| run | shards | wall s | rows/s | tokens/s | rows/s (embedding phase) | max abs diff to (a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in ((f"(a) one `Embedder.embed`, {r['threads']} threads, before (b)", a), ("(a) again, after (b)", a2)):
        lines.append(f"| {name} | | {x['wall_s']:.1f} | {x['rows_per_s']:.1f} | {x['tokens_per_s']:.0f} | | 0 |")
    for name, x in (("(b)", b), ("(c)", c)):
        lines.append(
            f"| {name} bulk, {x['actors']} actor(s) x {x['threads_per_actor']} thread(s) | {x['shards']} x "
            f"{x['shard_rows']} | {x['wall_s']:.1f} | {x['rows_per_s']:.1f} | {x['tokens_per_s']:.0f} | "
            f"{x['embed_rows_per_s']:.1f} | {x['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        f"Ray's overhead (a)/(b), (a) the mean of its two runs: **{r['overhead_wall']:.3f}** over wall time, "
        f"{r['overhead_embed']:.3f} over the embedding phase (target <= 1.10); against the slower and the faster "
        f"(a) run: {r['overhead_wall_range'][0]:.3f}-{r['overhead_wall_range'][1]:.3f}.",
        "",
        f"Resume: killed after {res['killed_after_s']:.1f} s with {res['done_at_kill']} of {res['shards']} shards "
        f"written; the rerun embedded {res['resumed_rows']} rows in {res['resume_wall_s']:.1f} s (its own Ray "
        f"connect, read and plan included), against {res['remaining_at_b_rate_s']:.1f} s for those rows at (b)'s rate: "
        f"**{res['ratio']:.3f}** (target <= 1.10).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bulk", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("bge-small-zh", "bge-large-zh", "tiny-zh"), default="bge-small-zh")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2, help="cores to use: (a) threads, (b) 1 x N, (c) N x 1")
    p.add_argument("--shard-rows", type=int, default=None, help="default: what the command line picks")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    shard_rows = args.shard_rows

    import onnxruntime
    import ray

    say(f"artifact for {args.arch} ...")
    artifact = prepare_artifact(args.arch)
    work = CACHE / "bulk-work" / args.arch
    texts = corpus(args.rows)
    src = work / "corpus.jsonl"
    write_corpus(texts, src)
    say("(a) one Embedder.embed call ...")
    a, reference = single_call(artifact, texts, args.threads)
    say(f"    {a['rows_per_s']:.1f} rows/s")
    from runtime.bulk.run import WORKER_NICENESS

    os.environ.setdefault(WORKER_NICENESS, "0")  # as runtime.bulk does when it starts a local Ray itself
    # (a), (b), (a) again with no Ray running, then (c) and resume: the two (a) runs bracket (b)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        say(f"(b) bulk 1 actor x {args.threads} threads ...")
        b = bulk(artifact, src, work / "out-b", 1, args.threads, shard_rows)
        b["max_abs_diff"] = max_diff(work / "out-b", reference)
        say(f"    {b['rows_per_s']:.1f} rows/s")
    finally:
        ray.shutdown()
    say("(a) again ...")
    a2, _ = single_call(artifact, texts, args.threads)
    say(f"    {a2['rows_per_s']:.1f} rows/s")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        say(f"(c) bulk {args.threads} actors x 1 thread ...")
        c = bulk(artifact, src, work / "out-c", args.threads, 1, shard_rows)
        c["max_abs_diff"] = max_diff(work / "out-c", reference)
        say(f"    {c['rows_per_s']:.1f} rows/s")
        say("resume after SIGKILL at 50% ...")
        res = resume(artifact, src, work / "out-r", address, args.threads, shard_rows, args.rows)
    finally:
        ray.shutdown()
    a_rate = (a["rows_per_s"] + a2["rows_per_s"]) / 2
    res["remaining_at_b_rate_s"] = res["resumed_rows"] / b["rows_per_s"]
    res["ratio"] = res["resume_wall_s"] / res["remaining_at_b_rate_s"]
    result = {
        "arch": args.arch, "precision": "int8", "rows": args.rows, "unique_texts": len(set(texts)),
        "threads": args.threads, "shard_rows_option": shard_rows, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
        "cpus": args.threads,
        "ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
        "single_call": a, "single_call_after": a2, "bulk_1x": b, "bulk_nx1": c, "resume": res,
        "overhead_wall": a_rate / b["rows_per_s"],
        "overhead_wall_range": sorted(x["rows_per_s"] / b["rows_per_s"] for x in (a, a2)),
        "overhead_embed": a_rate / b["embed_rows_per_s"],
    }
    save(args.out, f"bulk-{args.arch}", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
