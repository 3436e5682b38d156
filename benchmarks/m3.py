"""bge-m3 with all three outputs (dense, sparse, ColBERT): texts/s and peak memory per text length, ours (FP32,
INT8) against FlagEmbedding's BGEM3FlagModel (torch FP32, in its own venv), each case in a fresh process so the
peak resident memory is that case's own.

    python -m benchmarks.m3 --artifact DIR --checkpoint DIR [--lite DIR] [--lengths 128:16,512:8,2048:2,8192:1]

``--artifact``: ``python -m export --random-init bge-m3 --out DIR`` (or a real bge-m3 export); ``--checkpoint``: the
Hugging Face directory it came from (``--random-init`` keeps none on disk: ``benchmarks.m3_lite_peer prepare``
writes the same seeded one with ``export.architectures.materialise``). ``--lite``: bge-m3-lite's graphs of the
same checkpoint, run by bge-m3-lite 0.6.2 in its own venv (INT8 with its INT8, FP32 with its fused FP32); ``python -m benchmarks.m3_lite_peer prepare`` builds a checkpoint
with a SentencePiece tokenizer (what bge-m3-lite reads), our artifact and its graphs, so that all three engines
see the same token ids (checked per case: ``ids_equal``). Texts: the SOHU news documents of ../shared/data (copied into benchmarks/data), cut to exactly
the length. Prints a markdown table and writes benchmarks/results/m3.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from . import datasets, m3_lite_peer
from .common import cpu_flags, cpu_name, save


ROOT = Path(__file__).resolve().parent.parent
FLAG_ENV = m3_lite_peer.FLAG_ENV


def texts_of(length: int, n: int, tokenizer_json: Path) -> list[str]:
    """``n`` different texts of at least ``length`` tokens (each is cut to exactly ``length`` by max_length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    docs = datasets.sohu_long_documents()
    pool = "".join(docs)
    out, start = [], 0
    for _ in range(n):
        chars = length * 2
        while len(tok.encode(pool[start : start + chars]).ids) < length + 2:
            chars *= 2
            if start + chars > len(pool):
                start, pool = 0, pool + pool
        out.append(pool[start : start + chars])
        start += chars
    return out


# Each engine's child script: a prelude that defines ``warm()``, ``encode()`` (all three outputs of ``texts`` at
# ``length``) and ``colbert_rows(out)``, then the one measuring tail (peak after loading, time, rows checked).
_HEAD = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
length, texts = int(sys.argv[-2]), json.load(open(sys.argv[-1]))
"""

_MEASURE = """
warm()
load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
out = encode()
s = time.perf_counter() - t0
rows = colbert_rows(out)
assert all(n == length - 1 for n in rows), rows
print(json.dumps({"seconds": s, "load_gib": load, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

_OURS = """
from runtime import Embedder
emb = Embedder(sys.argv[1], precision=sys.argv[2])
warm = lambda: emb.encode(["warm up"], sparse=True, colbert=True)
encode = lambda: emb.encode(texts, batch_size=len(texts), sparse=True, colbert=True, max_length=length)
colbert_rows = lambda out: [len(c) for c in out.colbert]
"""

_FLAG = """
from FlagEmbedding import BGEM3FlagModel
m = BGEM3FlagModel(sys.argv[1], devices="cpu", use_fp16=False)
warm = lambda: m.encode(["warm up"], return_sparse=True, return_colbert_vecs=True)
encode = lambda: m.encode(texts, batch_size=len(texts), max_length=length, return_dense=True, return_sparse=True,
                          return_colbert_vecs=True)
colbert_rows = lambda out: [len(c) for c in out["colbert_vecs"]]
"""


def child_script(prelude: str) -> str:
    """The script a case runs in its own process (argv: engine's own arguments, then length and texts file)."""
    return _HEAD + prelude + _MEASURE


def _child(cmd: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same_ids(texts: list[str], tokenizer_json: Path, lite: Path, work: Path, length: int) -> bool:
    """Whether bge-m3-lite's own tokenizer gives the ids ours does for every text, as far as the cut to
    ``length`` tokens keeps them (``<s>`` and the first ``length - 2`` pieces; where a text is cut off mid-word
    at its end the two readers may end it differently, which the cut never reaches)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    ours = [e.ids for e in tok.encode_batch(texts)]
    theirs = m3_lite_peer.lite_ids(lite, texts, work)
    return all(a[: length - 1] == b[: length - 1] for a, b in zip(ours, theirs))


def encoder_flops(length: int, texts: int, layers: int = 24, hidden: int = 1024, ffn: int = 4096) -> float:
    """Floating-point operations (a multiply-add is 2) of the encoder's products and the ColBERT head for
    ``texts`` unpadded texts of ``length`` tokens: per token and layer the Q, K, V and output projections
    (4 H^2) and the FFN (2 H F), attention's scores and weighted sum (2 L H); then the H x H ColBERT head.
    Layer norms, softmax and GELU are left out (a few percent): the figure is a floor on the work."""
    per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * ffn + 2 * length * hidden) + 2 * hidden * hidden
    return float(per_token) * length * texts


def architecture(checkpoint: Path | None) -> dict:
    """Layers, hidden and FFN sizes from the checkpoint's config.json (bge-m3's when there is none)."""
    cfg = json.loads((checkpoint / "config.json").read_text()) if checkpoint and (checkpoint / "config.json").exists() else {}
    return {"layers": cfg.get("num_hidden_layers", 24), "hidden": cfg.get("hidden_size", 1024),
            "ffn": cfg.get("intermediate_size", 4096)}


def sgemm_gflops(threads: int = 2, seconds: float = 3.0) -> float:
    """This machine's FP32 ceiling now: onnxruntime's MLAS on one 2048 x 1024 x 4096 product (an FFN
    projection of 16 texts x 128 tokens), ``threads`` intra-op threads, best of a few seconds of runs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 2048, 1024, 4096
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "sgemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((m, k), dtype=np.float32)}
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, x)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def run(artifact: Path, checkpoint: Path | None, cases: list[tuple[int, int]], engines: list[str], work: Path,
        timeout: float, lite: Path | None = None) -> list[dict]:
    rows, arch = [], architecture(checkpoint)  # read config.json once, not per row
    for length, n in cases:
        path = work / f"texts-{length}.json"
        texts = texts_of(length, n, artifact / "tokenizer.json")
        path.write_text(json.dumps(texts, ensure_ascii=False))
        same = _same_ids(texts, artifact / "tokenizer.json", lite, work, length) if lite is not None else None
        for engine in engines:
            if engine.startswith("lite-"):
                if lite is None:
                    continue
                script = work / "lite.py"
                script.write_text(child_script(m3_lite_peer.LITE_PRELUDE))
                cmd = [str(m3_lite_peer.lite_python()), str(script), str(lite), engine[5:], str(length), str(path)]
            elif engine.startswith("ours-"):
                script = work / "ours.py"
                script.write_text(child_script(_OURS))
                cmd = [sys.executable, str(script), str(artifact), engine[5:], str(length), str(path)]
            else:
                if checkpoint is None:
                    continue
                script = work / "flag.py"
                script.write_text(child_script(_FLAG))
                cmd = [str(FLAG_ENV / "bin" / "python"), str(script), str(checkpoint), str(length), str(path)]
            t0 = time.perf_counter()
            got = _child(cmd, timeout)
            row = {"engine": engine, "length": length, "texts": n, **got}
            if engine.startswith("lite-"):
                row["ids_equal"] = same
            if "seconds" in got:
                row["texts_per_s"] = n / got["seconds"]
                row["gflops"] = encoder_flops(length, n, **arch) / got["seconds"] / 1e9
            rows.append(row)
            print(f"  {engine:>14} {length:>5} tokens x {n:>2}: "
                  + (f"{got['seconds']:.2f} s, peak {got['peak_gib']:.2f} GiB" if "seconds" in got else got["error"])
                  + f"  ({time.perf_counter() - t0:.0f} s with loading)", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], ceiling: float | None = None) -> str:
    """One row per engine and case; ours are also given against bge-m3-lite at the same precision. With the
    machine's FP32 ceiling (GFLOP/s), each row's rate of encoder products as a share of it: past 100% an FP32
    engine cannot go, so the share says how much any FP32 engine could still gain."""
    lines = ["| length x texts | engine | texts/s | seconds | peak memory (GiB) | vs FlagEmbedding | vs bge-m3-lite "
             "| GFLOP/s (share of FP32 ceiling) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["length"], r["engine"]): r for r in rows}

    def ratio(r: dict, ref: dict | None) -> str:
        if ref is None or ref is r or "texts_per_s" not in ref or "texts_per_s" not in r:
            return ""
        return f"{r['texts_per_s'] / ref['texts_per_s']:.2f}x"

    for r in rows:
        lite = by.get((r["length"], "lite-" + r["engine"][5:])) if r["engine"].startswith("ours-") else None
        if "seconds" in r:
            lines.append(f"| {r['length']} x {r['texts']} | {r['engine']} | {r['texts_per_s']:.2f} | {r['seconds']:.2f} | "
                         f"{r['peak_gib']:.2f} | {ratio(r, by.get((r['length'], 'flagembedding-fp32')))} | "
                         f"{ratio(r, lite)} | {r['gflops']:.0f}"
                         + (f" ({r['gflops'] / ceiling:.0%})" if ceiling else "") + " |")
        else:
            lines.append(f"| {r['length']} x {r['texts']} | {r['engine']} | failed: {r['error']} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=None, help="the checkpoint FlagEmbedding loads (omit: ours only)")
    p.add_argument("--lengths", default="128:16,512:8,2048:2,8192:1", help="length:texts,... (default: %(default)s)")
    p.add_argument("--lite", type=Path, default=None, help="bge-m3-lite's graphs (benchmarks.m3_lite_peer prepare)")
    p.add_argument("--engines", default="ours-int8,lite-int8,ours-fp32,lite-fp32,flagembedding-fp32")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--name", default="m3", help="results file name under benchmarks/results (default: %(default)s)")
    args = p.parse_args(argv)
    cases = [(int(a), int(b)) for a, b in (c.split(":") for c in args.lengths.split(","))]
    import tempfile

    ceilings = [sgemm_gflops()]  # before and after the cases: this VM's speed drifts, the higher one is the ceiling
    with tempfile.TemporaryDirectory(prefix="bge-m3-bench-") as tmp:
        rows = run(args.artifact, args.checkpoint, cases, args.engines.split(","), Path(tmp), args.timeout, args.lite)
    ceilings.append(sgemm_gflops())
    ceiling = max(ceilings)
    result = {"benchmark": "m3", "cpu": cpu_name(), "cpu_flags": cpu_flags(), "artifact": str(args.artifact), "rows": rows,
              "fp32_ceiling_gflops": ceilings, "architecture": architecture(args.checkpoint),
              "note": textwrap.shorten("each case in a fresh process; peak = the process's max resident memory "
                                       "(model load included); all three outputs asked for; GFLOP/s = the "
                                       "encoder's products and the ColBERT head / seconds; FP32 ceiling = "
                                       "onnxruntime MLAS on a 2048 x 1024 x 4096 product, 2 threads, before "
                                       "and after the cases", 400)}
    table = (markdown(rows, ceiling) + f"\n\nFP32 ceiling of this machine in this run (MLAS sgemm, 2 threads, before / "
             f"after the cases): {ceilings[0]:.0f} / {ceilings[1]:.0f} GFLOP/s.\n\nCPU: {result['cpu']}, flags: "
             f"{result['cpu_flags']}")
    print(table)
    save(ROOT / "benchmarks" / "results", args.name, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
