"""Latency and throughput of every path on the same texts, threads and machine, in one run.

    python -m benchmarks.speed                 # bge-large-zh architecture (random weights), full run
    python -m benchmarks.speed --quick         # bge-small-zh architecture, fewer texts

Paths: the PyTorch reference (transformers, CLS, fp32); sentence-transformers (torch backend); the
sentence-transformers ONNX recipe (optimum's plain export, fp32, and its avx512_vnni dynamic INT8 preset),
run by onnxruntime; ours fp32 and int8. Per path: batch-1 query latency p50/p99 (retrieval instruction +
short Chinese query), corpus throughput (texts/s, tokens/s), speed relative to sentence-transformers' torch
path, cold start in a fresh process (import, load, first vector), peak RSS of that process, and min cosine
to the reference. Plus the machine's measured fp32/int8 matrix-product peak through onnxruntime and the
fraction of it our paths reach. Writes JSON, markdown and a PNG chart under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets
from .common import cpu_name, save

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache"

PATHS = ("torch", "st-torch", "st-onnx-fp32", "st-onnx-int8", "ours-fp32", "ours-int8")
LABELS = {
    "torch": "PyTorch reference (transformers fp32)",
    "st-torch": "sentence-transformers torch",
    "st-onnx-fp32": "ST ONNX recipe fp32 (plain export)",
    "st-onnx-int8": "ST ONNX recipe int8 (optimum avx512_vnni)",
    "ours-fp32": "ours fp32",
    "ours-int8": "ours int8",
}


# ---------------------------------------------------------------------------------------------- setup
def export_fingerprint() -> str:
    """sha256 of the export stage's code and calibration text: a cached artifact built by other code is stale."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "export"
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")) + sorted(root.glob("*.txt")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def prepare(arch: str) -> dict[str, Path]:
    """Random checkpoint, our artifact (fp32, int8) and the ST-recipe graphs, cached between runs; our
    artifact is rebuilt whenever the export code changed since it was built."""
    import shutil

    base = CACHE / arch
    ckpt, artifact = base / "checkpoint", base / "artifact"
    plain, preset = base / "st-onnx-fp32.onnx", base / "st-onnx-int8.onnx"
    if not (ckpt / "config.json").is_file():
        from export.architectures import materialise

        materialise(arch, ckpt, seed=0)
    stamp, fingerprint = base / "artifact.export-fingerprint", export_fingerprint()
    if artifact.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(artifact)
    if not (artifact / "manifest.json").is_file():
        from export.cli import main as export_main

        if export_main(["--model", str(ckpt), "--out", str(artifact), "--precision", "fp32,int8",
                        "--query-instruction", "为这个句子生成表示以用于检索相关文章："]) != 0:
            raise SystemExit("export failed")
        stamp.write_text(fingerprint)
    if not preset.is_file():
        from export.graph import export_onnx
        from export.reference import load_model
        from export.source import resolve

        from .stock import quantize_optimum_avx512_vnni

        spec = resolve(str(ckpt), workdir=base)
        export_onnx(load_model(spec, attn_implementation="eager"), spec.pooling, spec.normalize, plain)
        quantize_optimum_avx512_vnni(plain, preset)
    return {"checkpoint": ckpt, "artifact": artifact, "st-onnx-fp32": plain, "st-onnx-int8": preset}


def make_path(name: str, files: dict[str, Path], threads: int):
    from .paths import OnnxFilePath, OursPath, SentenceTransformersPath, TorchPath

    if name == "torch":
        from export.source import resolve

        return TorchPath(resolve(str(files["checkpoint"]), workdir=files["checkpoint"].parent), threads=threads)
    if name == "st-torch":
        return SentenceTransformersPath(files["checkpoint"], threads=threads)
    if name.startswith("st-onnx"):
        art = files["artifact"]
        return OnnxFilePath(LABELS[name], files[name], art / "tokenizer.json", 512, 0, threads)
    return OursPath(files["artifact"], name.split("-")[1], threads=threads)


# ---------------------------------------------------------------------------------------------- texts
def texts(quick: bool) -> tuple[list[str], list[str]]:
    short = datasets.sts_b_zh().first[: 100 if quick else 200]
    long = datasets.sohu_long_documents()[: 8 if quick else 24]
    instruction = "为这个句子生成表示以用于检索相关文章："
    queries = [instruction + q for q in datasets.zh_queries()[: 30 if quick else 100]]
    return short + long, queries


def count_tokens(artifact: Path, items: list[str]) -> list[int]:
    from runtime.tokenizer import TextTokenizer

    return list(TextTokenizer(artifact / "tokenizer.json", 512).encode(items).lengths)


# ---------------------------------------------------------------------------------------------- peak
def measure_peak(threads: int) -> dict[str, float]:
    """ops/s of one large matrix product through onnxruntime, fp32 (MatMul) and int8 (MatMulInteger)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 2048, 1024, 4096
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("fp32", "int8"):
        if kind == "fp32":
            w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
            node = helper.make_node("MatMul", ["x", "w"], ["y"])
            x_type, y_type, x = TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((m, k)).astype(np.float32)
            inits = [w]
        else:
            w = numpy_helper.from_array(rng.integers(-64, 64, (k, n)).astype(np.int8), "w")
            node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
            x_type, y_type, x = TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 255, (m, k)).astype(np.uint8)
            inits = [w]
        g = helper.make_graph([node], "peak", [helper.make_tensor_value_info("x", x_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, {"x": x})
        reps, start = 10, time.perf_counter()
        for _ in range(reps):
            sess.run(None, {"x": x})
        out[kind] = 2 * m * k * n * reps / (time.perf_counter() - start)
    return out


def model_ops(config: dict, lengths: list[int]) -> float:
    """Multiply-adds x2 of the encoder for texts of these token lengths (projections, FFN, attention)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = 2 * (4 * h * h + 2 * h * i)
    return float(sum(layers * (per_token * s + 4 * s * s * h) for s in lengths))


# ---------------------------------------------------------------------------------------------- measure
def cold_start(name: str, arch: str, threads: int) -> dict[str, float]:
    """Fresh interpreter: import, load, first vector; then a 32-text corpus slice for peak RSS."""
    code = (
        "import time; t=time.perf_counter();"
        "from benchmarks.speed import make_path, prepare, texts;"
        f"p=make_path({name!r}, prepare({arch!r}), {threads}); p.embed(['你好']);"
        "cold=time.perf_counter()-t; c,_=texts(True); p.embed(c[-40:], batch_size=32);"
        "from benchmarks.common import peak_rss_mb; print(cold, peak_rss_mb())"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"cold start of {name} failed: {out.stderr[-2000:]}")
    cold, rss = map(float, out.stdout.split()[-2:])
    return {"cold_start_s": cold, "peak_rss_mb": rss}


def measure(name: str, files, corpus, queries, threads: int, reference=None) -> tuple[dict, np.ndarray]:
    path = make_path(name, files, threads)
    for q in queries[:5]:
        path.embed([q], batch_size=1)
    lat = []
    for q in queries:
        start = time.perf_counter()
        path.embed([q], batch_size=1)
        lat.append(time.perf_counter() - start)
    path.embed(corpus[:32], batch_size=32)
    start = time.perf_counter()
    vecs = path.embed(corpus, batch_size=32)
    seconds = time.perf_counter() - start
    row = {
        "path": name,
        "label": LABELS[name],
        "latency_p50_ms": 1000 * float(np.percentile(lat, 50)),
        "latency_p99_ms": 1000 * float(np.percentile(lat, 99)),
        "corpus_seconds": seconds,
        "texts_per_s": len(corpus) / seconds,
    }
    if reference is not None:
        row["min_cosine_to_reference"] = float((vecs.astype(np.float64) * reference).sum(1).min())
    del path
    return row, vecs


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["path"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].barh(labels, [r["latency_p50_ms"] for r in rows], color="tab:blue")
    ax[0].set_xlabel("batch-1 query latency p50 (ms, lower is better)")
    ax[1].barh(labels, [r["tokens_per_s"] for r in rows], color="tab:green")
    ax[1].set_xlabel("corpus throughput (tokens/s, higher is better)")
    fig.suptitle(f"{result['arch']} (random weights), {result['threads']} threads, {result['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict) -> str:
    lines = [
        f"{result['arch']} architecture (random weights); {result['corpus_texts']} corpus texts "
        f"({result['corpus_tokens']} tokens), {result['queries']} queries (~{result['query_tokens_mean']:.0f} tokens); "
        f"{result['threads']} threads on {result['cpu']}; onnxruntime peak fp32 {result['peak_gops']['fp32']:.0f} "
        f"GFLOP/s, int8 {result['peak_gops']['int8']:.0f} GOP/s.",
        "",
        "| path | query p50 (ms) | query p99 (ms) | texts/s | tokens/s | vs ST torch | cold start (s) | peak RSS (MB) | min cos to ref | % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['texts_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['speedup_vs_st_torch']:.2f}x | {r.get('cold_start_s', float('nan')):.2f} | "
            f"{r.get('peak_rss_mb', float('nan')):.0f} | {r.get('min_cosine_to_reference', float('nan')):.5f} | "
            f"{r['fraction_of_peak'] * 100:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bge-small-zh and fewer texts")
    p.add_argument("--arch", default=None, help="architecture (default bge-large-zh, bge-small-zh with --quick)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {','.join(PATHS)}")
    p.add_argument("--no-cold", action="store_true", help="skip the fresh-process cold start runs")
    p.add_argument("--cold-only", action="store_true",
                   help="re-measure only cold start and peak RSS into the existing results JSON")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arch = args.arch or ("bge-small-zh" if args.quick else "bge-large-zh")
    names = [n for n in args.paths.split(",") if n]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    say(f"preparing {arch} (export is cached in {CACHE}) ...")
    files = prepare(arch)
    if args.cold_only:
        result = json.loads((args.out / f"speed-{arch}.json").read_text())
        for r in result["rows"]:
            if r["path"] in names:
                say(f"[{r['path']}] cold start in a fresh process ...")
                r.update(cold_start(r["path"], arch, args.threads))
        md = table(result)
        print(md)
        save(args.out, f"speed-{arch}", result, md)
        chart(result, args.out / f"speed-{arch}.png")
        return 0
    corpus, queries = texts(args.quick)
    lengths = count_tokens(files["artifact"], corpus)
    qlengths = count_tokens(files["artifact"], queries)
    config = json.loads((files["checkpoint"] / "config.json").read_text())
    say("measuring the machine's matrix-product peak ...")
    peak = measure_peak(args.threads)
    rows, reference = [], None
    for name in names:
        say(f"[{name}] latency ({len(queries)} queries) and throughput ({len(corpus)} texts) ...")
        row, vecs = measure(name, files, corpus, queries, args.threads, reference)
        if reference is None and name == "torch":
            reference = vecs.astype(np.float64)
            row["min_cosine_to_reference"] = 1.0
        if not args.no_cold:
            say(f"[{name}] cold start in a fresh process ...")
            row.update(cold_start(name, arch, args.threads))
        rows.append(row)
    ops = model_ops(config, lengths)
    for r in rows:
        r["tokens_per_s"] = sum(lengths) / r["corpus_seconds"]
        rate = peak["int8"] if r["path"].endswith("int8") else peak["fp32"]
        r["fraction_of_peak"] = ops / r["corpus_seconds"] / rate
    st = next((r for r in rows if r["path"] == "st-torch"), rows[0])
    for r in rows:
        r["speedup_vs_st_torch"] = r["texts_per_s"] / st["texts_per_s"]
    result = {
        "arch": arch,
        "threads": args.threads,
        "cpu": cpu_name(),
        "corpus_texts": len(corpus),
        "corpus_tokens": int(sum(lengths)),
        "queries": len(queries),
        "query_tokens_mean": float(np.mean(qlengths)),
        "peak_gops": {k: v / 1e9 for k, v in peak.items()},
        "model_gops_corpus": ops / 1e9,
        "rows": rows,
    }
    md = table(result)
    print(md)
    save(args.out, f"speed-{arch}", result, md)
    chart(result, args.out / f"speed-{arch}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
