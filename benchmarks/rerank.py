"""Reranker speed, side by side in one run: pairs/s and the latency of ranking 1 query x 50 passages, for our
INT8 and FP32 artifacts against sentence-transformers' ``CrossEncoder`` (torch) and its best ONNX path (the
plain traced graph quantised with optimum's avx512_vnni dynamic preset, what sentence-transformers'
``export_dynamic_quantized_onnx_model`` applies; optimum itself cannot be installed beside transformers 5), fed
the same tokens in the same length-sorted batches. Passages: ``benchmarks/data/zh-query-pos-neg.jsonl``.

    python -m benchmarks.rerank --arch bge-reranker-base      # random weights of the architecture (offline)
    python -m benchmarks.rerank --checkpoint DIR --artifact DIR
    python -m benchmarks.rerank --fastembed on                # also fastembed's TextCrossEncoder (own venv)

With ``--fastembed`` (default ``auto``: on where its venv exists) fastembed's ``TextCrossEncoder`` is a peer
too, run in its own venv on our FP32 graph (plus an Unsqueeze to the [batch, 1] logits it reads), tokenised
and batched as fastembed does it; see ``benchmarks/fastembed_peer.py``.

Also the quality table of the trained cross-encoder (``--quality``): MiniLM fine-tuned on STS-B en odd rows
(benchmarks/cross_encoder.py), measured on the held-out even rows: Spearman to gold for FP32 and INT8, and
how INT8 ranks each query's passages against FP32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .common import cpu_flags, cpu_name, save

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "zh-query-pos-neg.jsonl"
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"


def query_groups(n_queries: int, per_query: int = 50) -> list[tuple[str, list[str]]]:
    """Queries with ``per_query`` passages each: its positives and negatives, then other queries' passages."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = [p for r in rows for p in r["pos"] + r["neg"]]
    groups = []
    for k, r in enumerate(rows[:n_queries]):
        own = (r["pos"] + r["neg"])[:per_query]
        start = (k * 97) % max(1, len(pool) - per_query)
        groups.append((r["query"], own + pool[start : start + per_query - len(own)]))
    return groups


def _artifacts(arch: str) -> tuple[Path, Path]:
    """A cached random checkpoint of ``arch`` and its exported artifact (built once; minutes for the large)."""
    from export.architectures import materialise
    from export.cli import main as export_main

    ckpt, art = CACHE / f"{arch}-checkpoint", CACHE / f"{arch}-random"
    if not (ckpt / "config.json").is_file():
        materialise(arch, ckpt, seed=0)
    if not (art / "manifest.json").is_file():
        if export_main(["--model", str(ckpt), "--out", str(art), "--precision", "fp32,int8"]) != 0:
            raise SystemExit(f"export of {arch} failed")
    return ckpt, art


class StockOnnx:
    """The plain traced graph (no fusions of ours; onnxruntime's own at session load) quantised with
    optimum's avx512_vnni dynamic preset, fed our tokens: sentence-transformers' best CPU ONNX path."""

    def __init__(self, checkpoint: Path, work: Path, threads: int | None) -> None:
        import onnxruntime as ort

        from export.graph import export_onnx
        from export.reference import load_model
        from export.source import resolve

        from .stock import quantize_optimum_avx512_vnni

        spec = resolve(str(checkpoint), workdir=work)
        plain, q8 = work / "plain.onnx", work / "plain-int8.onnx"
        self.names = export_onnx(load_model(spec, attn_implementation="eager"), "cls", False, plain, kind="reranker")
        quantize_optimum_avx512_vnni(plain, q8)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(q8), opts, providers=["CPUExecutionProvider"])

    def score_st_style(self, tokenizer, pairs: list[tuple[str, str]], max_length: int, batch_size: int) -> np.ndarray:
        """As sentence-transformers' ONNX backend feeds it: the HF tokenizer on each batch of pairs in input
        order (``longest_first`` truncation), padded to the batch's longest."""
        out = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tokenizer([q for q, _ in chunk], [p for _, p in chunk], padding=True, truncation=True,
                            max_length=max_length, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) for k in self.names}
            out.append(self.sess.run(None, feed)[0].reshape(-1))
        return np.concatenate(out)

    def score_rows(self, rr, enc, batch_size: int) -> np.ndarray:
        from runtime.batching import make_batches
        from runtime.pairs import segment_ids

        out = np.empty(len(enc.ids), np.float32)
        for b in make_batches(enc.ids, enc.lengths, rr.manifest.pad_token_id, batch_size, 16384):
            feed = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
            if "token_type_ids" in self.names:
                feed["token_type_ids"] = segment_ids(enc.lengths[b.indices],
                                                     [enc.segment_start[i] for i in b.indices], b.input_ids.shape)
            out[b.indices] = self.sess.run(None, feed)[0].reshape(-1)
        return out


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _row(n_pairs: int, t_bulk: list[float], t_one: list[float]) -> dict:
    return {"pairs_per_s": n_pairs / min(t_bulk), "one_x_50_ms_median": 1000 * statistics.median(t_one),
            "one_x_50_ms_p90": 1000 * float(np.percentile(t_one, 90))}


def fastembed_rows(artifact: Path, pairs, one, ours_fp32, ours_rows, repeats: int, threads: int | None,
                   ours_session: bool, venv: Path) -> tuple[dict, dict]:
    """fastembed's rows (``benchmarks.fastembed_peer``), timed with ``_time`` in its venv, and what to know
    about them: versions, the graph adaptation, its scores against ours FP32, pairs it tokenised otherwise."""
    from runtime.providers import DISABLED_OPTIMIZERS

    from . import fastembed_peer

    model_dir = fastembed_peer.prepare_model(artifact, CACHE / f"{artifact.name}-fastembed")
    info = {"adaptation": fastembed_peer.model_info(model_dir)["adaptation"], "runs": {}}
    rows = {}
    variants = [(FASTEMBED, ())]
    if ours_session:
        variants.append((FASTEMBED_OURS_SESSION, DISABLED_OPTIMIZERS["cpu"]))
    for name, disabled in variants:
        r = fastembed_peer.run_peer(model_dir, pairs, one, timer=_time, repeats=repeats,
                                    bulk_repeats=max(1, repeats // 3), threads=threads,
                                    disabled_optimizers=disabled, venv=venv)
        rows[name] = _row(len(pairs), r["t_bulk"], r["t_one"])
        differ = [i for i, (a, b) in enumerate(zip(ours_rows, r["token_rows"])) if list(a) != b]
        same = np.ones(len(pairs), bool)
        same[differ] = False
        diff = np.abs(np.asarray(r["scores_bulk"], np.float64) - ours_fp32)
        info["versions"] = r["versions"]
        info["session"] = r["session"]
        info["runs"][name] = {"disabled_optimizers": list(disabled), "pairs_tokenised_otherwise": len(differ),
                              "max_abs_diff_vs_ours_fp32": float(diff[same].max()) if same.any() else None,
                              "max_abs_diff_all_pairs": float(diff.max())}
    return rows, info


def speed(checkpoint: Path, artifact: Path, n_queries: int, repeats: int, threads: int | None,
          fastembed: bool = False, fastembed_ours_session: bool = False, fastembed_venv: Path | None = None) -> dict:
    import torch
    from sentence_transformers import CrossEncoder

    from runtime import Reranker
    from runtime.providers import usable_cores

    if threads:
        torch.set_num_threads(threads)
    groups = query_groups(n_queries)
    pairs = [(q, p) for q, ps in groups for p in ps]
    one = [(groups[0][0], p) for p in groups[0][1]]
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = {p: Reranker(artifact, device="cpu", precision=p, threads=threads) for p in ("int8", "fp32")}
        cores = ours["int8"].threads or usable_cores()
        ours_k = Reranker(artifact, device="cpu", precision="int8", workers=cores)  # the server's layout: K x 1 thread
        enc_all, enc_one = ours["int8"].tokenize_pairs(pairs), ours["int8"].tokenize_pairs(one)
        ce = CrossEncoder(str(checkpoint), device="cpu", max_length=ours["int8"].max_length)
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(checkpoint))
        max_len = ours["int8"].max_length
        with tempfile.TemporaryDirectory() as tmp:
            stock = StockOnnx(checkpoint, Path(tmp), threads)
        tokens = int(enc_all.lengths.sum())
        candidates = {
            "ours int8": (lambda: ours["int8"].score(pairs, 32), lambda: ours["int8"].score(one, 64)),
            f"ours int8, {cores} workers x 1 thread (batches of 8)":
                (lambda: ours_k.score(pairs, 8), lambda: ours_k.score(one, 8)),
            "ours fp32": (lambda: ours["fp32"].score(pairs, 32), lambda: ours["fp32"].score(one, 64)),
            ST_FED:
                (lambda: stock.score_st_style(hf_tok, pairs, max_len, 32), lambda: stock.score_st_style(hf_tok, one, max_len, 64)),
            STOCK_OURS_FED:
                (lambda: stock.score_rows(ours["int8"], enc_all, 32), lambda: stock.score_rows(ours["int8"], enc_one, 64)),
            ST_TORCH:
                (lambda: ce.predict(pairs, batch_size=32), lambda: ce.predict(one, batch_size=64)),
        }
        for name, (bulk, single) in candidates.items():
            t_bulk = _time(bulk, max(1, repeats // 3))
            t_one = _time(single, repeats)
            rows[name] = _row(len(pairs), t_bulk, t_one)
        extra = {}
        if fastembed:
            from .fastembed_peer import DEFAULT_VENV, FastembedPeerError

            try:
                fe_rows, extra["fastembed"] = fastembed_rows(
                    artifact, pairs, one, ours["fp32"].score(pairs, 32).astype(np.float64), enc_all.ids, repeats,
                    threads, fastembed_ours_session, fastembed_venv or DEFAULT_VENV)
                rows.update(fe_rows)
            except FastembedPeerError as exc:  # keep the other rows; say why this one is missing
                print(f"fastembed peer failed, its row is left out: {exc}", file=sys.stderr)
                extra["fastembed_error"] = str(exc)
    return {"pairs": len(pairs), "tokens": tokens, "rows": rows, **extra}


def quality(epochs: int = 2) -> dict:
    """The trained cross-encoder's FP32 and INT8 on the held-out STS-B rows (Spearman to gold), and INT8's
    ranking of each sentence's candidates against FP32."""
    from export.cli import main as export_main
    from export.labelled import spearman
    from export.validate import ranking_figures
    from runtime import Reranker

    from .cross_encoder import finetune, stsb_split, write_tsv

    ckpt, art = CACHE / "minilm-cross-encoder", CACHE / "minilm-cross-encoder-artifact"
    split = stsb_split()
    if not (ckpt / "config.json").is_file():
        finetune(ckpt, epochs=epochs)
    if not (art / "manifest.json").is_file():
        held = write_tsv(split.held_out, CACHE / "sts-b-en-held-out.tsv")
        if export_main(["--model", str(ckpt), "--out", str(art), "--validate-with", str(held)]) != 0:
            raise SystemExit("export of the trained cross-encoder failed its gates")
    pairs = [(a, b) for a, b, _ in split.held_out]
    gold = np.array([s for _, _, s in split.held_out])
    scores = {p: Reranker(art, device="cpu", precision=p).score(pairs) for p in ("fp32", "int8")}
    # ranking: each held-out first sentence against 20 candidates (its own second sentence and 19 others)
    firsts = [a for a, _, _ in split.held_out[:100]]
    seconds = [b for _, b, _ in split.held_out]
    groups = [[(q, seconds[(i + 7 * k) % len(seconds)]) for k in range(20)] for i, q in enumerate(firsts)]
    ranked = {p: [Reranker(art, device="cpu", precision=p).score(g) for g in groups] for p in ("fp32", "int8")}
    fig = ranking_figures(ranked["int8"], ranked["fp32"])
    manifest = json.loads((art / "manifest.json").read_text())
    return {
        "pairs": len(pairs),
        "spearman": {p: spearman(s, gold) for p, s in scores.items()},
        "int8_vs_fp32_ranking": fig,
        "export_gate": manifest["variants"]["int8"]["parity"]["ranking"],
        "sizes_mb": {p: v["files"][0]["size_bytes"] / 1e6 for p, v in manifest["variants"].items()},
    }


ST_FED = "sentence-transformers onnx int8 (optimum avx512_vnni preset), fed as ST feeds it"
STOCK_OURS_FED = "same stock int8 graph, fed our tokens in our length-sorted batches"
ST_TORCH = "sentence-transformers CrossEncoder torch fp32"
FASTEMBED = "fastembed TextCrossEncoder on our fp32 graph (+Unsqueeze), fed as fastembed feeds it"
FASTEMBED_OURS_SESSION = "same, its session loaded as ours (SkipLayerNormFusion off)"


def render(result: dict) -> str:
    m = result["machine"]
    md = [f"# Rerank speed, {result['label']} ({m['cpu']}; {m['flags']}; threads {result['threads'] or 'all'}; "
          f"{m['date']})", "",
          f"{result['pairs']} pairs ({result['tokens']} tokens, zh-query-pos-neg) for pairs/s; 1 query x 50 passages "
          f"for latency (median and p90 of {result['repeats']}).", "",
          "| path | pairs/s | 1 x 50 median (ms) | 1 x 50 p90 (ms) |", "|---|---:|---:|---:|"]
    rows = result["rows"]
    for name, row in rows.items():
        md.append(f"| {name} | {row['pairs_per_s']:.1f} | {row['one_x_50_ms_median']:.0f} | {row['one_x_50_ms_p90']:.0f} |")
    ours_pps = max(v["pairs_per_s"] for k, v in rows.items() if k.startswith("ours int8"))
    ours_lat = min(v["one_x_50_ms_median"] for k, v in rows.items() if k.startswith("ours int8"))
    st, graph, torch_ = rows[ST_FED], rows[STOCK_OURS_FED], rows[ST_TORCH]
    md += ["", f"Ours INT8 (best layout) against sentence-transformers' best CPU path as it runs (its qint8 ONNX recipe, "
           f"its feeding): {ours_pps / st['pairs_per_s']:.2f}x the pairs/s (target 1.7x), 1 x 50 latency "
           f"{ours_lat / st['one_x_50_ms_median']:.2f}x (target <= 0.6x); against its torch path "
           f"{ours_pps / torch_['pairs_per_s']:.2f}x (target 5x). Against the same stock INT8 graph fed our tokens "
           f"in our batches (the graphs alone): {ours_pps / graph['pairs_per_s']:.2f}x the pairs/s, latency "
           f"{ours_lat / graph['one_x_50_ms_median']:.2f}x."]
    fe = result.get("fastembed")
    if fe:
        ours32 = rows["ours fp32"]
        v = fe["versions"]
        md += ["", f"fastembed {v['fastembed']} (onnxruntime {v['onnxruntime']}, own venv): `rerank_pairs` (batch 32) "
               f"for pairs/s, `rerank` (batch 64) for 1 x 50, on our FP32 graph with one change ({fe['adaptation']}); "
               "its tokenizer pads each batch to its longest in input order and cuts pairs `longest_first` at "
               "max_length with no query cap."]
        for name, run in fe["runs"].items():
            row = rows[name]
            off = ", ".join(run["disabled_optimizers"]) or "none (fastembed as it is: SkipLayerNormFusion on)"
            agree = run["max_abs_diff_vs_ours_fp32"]
            agree = "n/a" if agree is None else f"{agree:.2e}"
            md.append(f"- {name}: {row['pairs_per_s'] / ours32['pairs_per_s']:.2f}x ours fp32's pairs/s, 1 x 50 "
                      f"latency {row['one_x_50_ms_median'] / ours32['one_x_50_ms_median']:.2f}x; optimizers off: "
                      f"{off}; scores vs ours fp32 max |diff| {agree} on the "
                      f"{result['pairs'] - run['pairs_tokenised_otherwise']} pairs tokenised alike "
                      f"({run['pairs_tokenised_otherwise']} tokenised otherwise).")
    if result.get("fastembed_error"):
        md += ["", f"fastembed peer failed, row left out: {result['fastembed_error'].splitlines()[0]}"]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerank", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="bge-reranker-base", help="random-weight architecture to build (cached)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a cross-encoder checkpoint (with --artifact)")
    p.add_argument("--artifact", type=Path, default=None)
    p.add_argument("--queries", type=int, default=8, help="queries x 50 passages for pairs/s")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fastembed", choices=("auto", "on", "off"), default="auto",
                   help="fastembed's TextCrossEncoder as a peer (auto: where its venv exists)")
    p.add_argument("--fastembed-ours-session", action="store_true",
                   help="also a fastembed row with its session loaded as ours (SkipLayerNormFusion off)")
    p.add_argument("--fastembed-venv", type=Path, default=None, help="fastembed's venv (default: in the cache)")
    p.add_argument("--quality", action="store_true", help="the trained cross-encoder's quality table instead")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "date": time.strftime("%Y-%m-%d")}
    if args.quality:
        q = quality()
        md = [f"# Trained cross-encoder, FP32 vs INT8 ({machine['cpu']}; {machine['flags']}; {machine['date']})", "",
              f"all-MiniLM-L6-v2 fine-tuned as a cross-encoder on STS-B en odd rows; held-out even rows ({q['pairs']} pairs).", "",
              "| variant | size (MB) | Spearman to gold |", "|---|---:|---:|"]
        md += [f"| {v} | {q['sizes_mb'][v]:.1f} | {q['spearman'][v]:.4f} |" for v in ("fp32", "int8")]
        f = q["int8_vs_fp32_ranking"]
        md += ["", f"INT8 against FP32, {f['queries']} queries x 20 candidates: Kendall tau min {f['min_kendall_tau']:.3f} / "
               f"mean {f['mean_kendall_tau']:.3f}, top-3 overlap {f['mean_top3_overlap']:.3f}, max sigmoid error "
               f"{f['max_sigmoid_error']:.4f}, max logit difference {f['max_abs_logit_diff']:.3f}."]
        save(args.out, "rerank-quality", {"machine": machine, **q}, "\n".join(md))
        print("\n".join(md))
        return 0
    if args.checkpoint is not None:
        if args.artifact is None:
            p.error("--checkpoint needs --artifact")
        ckpt, art, label = args.checkpoint, args.artifact, args.checkpoint.name
    else:
        (ckpt, art), label = _artifacts(args.arch), args.arch
    from . import fastembed_peer

    fe_venv = args.fastembed_venv or fastembed_peer.DEFAULT_VENV
    use_fastembed = args.fastembed != "off" and fastembed_peer.venv_python(fe_venv) is not None
    if args.fastembed != "off" and not use_fastembed:
        msg = f"fastembed peer: no venv at {fe_venv}; create it with: {fastembed_peer.SETUP_HINT}"
        if args.fastembed == "on":
            p.error(msg)
        print(f"{msg} (skipped; --fastembed off silences this)", file=sys.stderr)
    r = speed(ckpt, art, args.queries, args.repeats, args.threads, use_fastembed, args.fastembed_ours_session, fe_venv)
    result = {"machine": machine, "threads": args.threads, "label": label, "repeats": args.repeats, **r}
    md = render(result)
    save(args.out, f"rerank-{label}", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
