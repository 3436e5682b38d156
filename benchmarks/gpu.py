"""The CUDA check and benchmark, prepared to run in ONE call on a lent GPU machine.

    python -m benchmarks.gpu --out "$OUT"                # on the GPU machine: bge-large-zh architecture
    python -m benchmarks.gpu --dry-run --out /tmp/gpu    # CPU rehearsal: tiny model, CPU provider, few reps
    python -m benchmarks.gpu --out "$OUT" --keep /tmp/g   # keep checkpoint/ and artifact/ for benchmarks.serve

Steps: build the architecture with seeded random weights; export FP32 and FP16 with `python -m export`;
check our FP16 path (onnxruntime CUDA provider, through the runtime) against the FP32 PyTorch reference on
the GPU (TF32 off), on probes, Chinese sentences, news documents cut at 512 tokens and degenerate 512-token
inputs: min cosine and any NaN/inf. Then time, side by side, PyTorch FP16 (transformers with SDPA
attention, CLS + normalise: what a GPU user runs) and our FP16 path, both host arrays in and host vectors
out: batch-1 queries from text (p50, p99), and throughput on 64 x 128 and 32 x 512 token batches; measure
the GPU's FP16 matrix peak with one large cuBLAS product and report the fraction of it each path reaches;
profile our graph on one 64 x 128 batch per operator type. Writes ``gpu-<card>.json`` and ``.md`` in --out.
See benchmarks/NOTES.md ("GPU run") for the device-tool calls that bring onnxruntime-gpu to the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np

from . import datasets
from .common import save

INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
SHAPES = ((64, 128), (32, 512))
TARGETS = {"throughput_vs_torch_fp16": 1.2, "latency_vs_torch_fp16": 0.5, "min_cos_vs_fp32": 0.999}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; anything else -> a filesystem-safe lower-case name."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower() or "unknown"


def check_texts(quick: bool) -> list[str]:
    """Probes, Chinese sentences, long news (cut at 512 tokens) and degenerate full-length inputs."""
    from export.probes import PROBES

    sts = datasets.sts_b_zh().first[: 32 if quick else 256]
    news = datasets.sohu_long_documents()[: 4 if quick else 32]
    degenerate = ["好" * 600, "。" * 600, "\U0001F600" * 600, "a" * 3000, "1234567890" * 300]
    return list(PROBES) + sts + news + degenerate


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


class TorchFp16:
    """transformers BertModel with SDPA attention in half precision on the device, CLS + normalise."""

    def __init__(self, spec, device: str, dtype) -> None:
        import torch

        from export.reference import load_model, load_tokenizer

        self.torch, self.device, self.spec = torch, device, spec
        self.model = load_model(spec, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
        self.tokenizer = load_tokenizer(spec)

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from export.reference import pool

        torch = self.torch
        with torch.inference_mode():
            i = torch.from_numpy(ids).to(self.device, non_blocking=True)
            m = torch.from_numpy(mask).to(self.device, non_blocking=True)
            hidden = self.model(input_ids=i, attention_mask=m).last_hidden_state
            v = torch.nn.functional.normalize(pool(hidden, m, self.spec.pooling).float(), dim=-1)
            return v.cpu().numpy()

    def embed_text(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="np")
        return self.embed_tokens(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))


def reference_fp32(spec, device: str, texts: list[str]) -> np.ndarray:
    """The FP32 reference on the device with TF32 off (TF32 would make the 'reference' a 10-bit one)."""
    import torch

    from export.reference import ReferenceEmbedder, load_model

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ref = ReferenceEmbedder(spec, model=load_model(spec, attn_implementation="eager").to(device))
    return ref.embed(texts, batch_size=16)


def matmul_peak(device: str, dtype, n: int, reps: int) -> float:
    """FLOP/s of one n x n x n product in ``dtype`` (cuBLAS on the GPU): the machine's practical peak."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def time_batches(fn, ids: np.ndarray, mask: np.ndarray, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn(ids, mask)
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(ids, mask)  # host arrays in, host vectors out: the copy back synchronises
        out.append(time.perf_counter() - start)
    return out


def profile_ours(model: Path, device: str, ids: np.ndarray, mask: np.ndarray, runs: int) -> dict:
    from runtime.batching import Batch
    from runtime.providers import CPU, CUDA, cuda_options

    from .profile import profile_graph

    providers = [(CUDA, cuda_options(0)), CPU] if device == "cuda" else [CPU]
    batches = [Batch(indices=np.arange(len(ids)), input_ids=ids, attention_mask=mask)] * runs
    s = profile_graph(model, {"batch": batches}, threads=None, providers=providers, warmup=2)["batch"]
    top = dict(list(s["per_type_us"].items())[:12])
    return {"runs": runs, "node_us_per_run": s["node_us"] / runs, "run_us_per_run": s["run_us"] / runs,
            "top_op_types_us_per_run": {k: v / runs for k, v in top.items()},
            # the graph ships Add + LayerNormalization (the fast form on CPU); on CUDA onnxruntime should
            # fuse them back into SkipLayerNormalization at load: this records whether it did
            "layer_norm_ops": {k: s["events"].get(k, 0) // max(runs, 1) for k in
                               ("SkipLayerNormalization", "LayerNormalization", "Add")}}


def run(out: Path, dry_run: bool, arch: str | None, keep: Path | None = None) -> dict:
    import onnxruntime as ort
    import torch

    from export.architectures import materialise
    from export.cli import main as export_main
    from export.source import resolve
    from runtime import Embedder, TruncationWarning

    from .speed import model_ops

    arch = arch or ("tiny-zh" if dry_run else "bge-large-zh")
    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch; on a CPU machine use --dry-run")
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"onnxruntime {ort.__version__} at {ort.__file__} has no CUDA provider "
                         f"({ort.get_available_providers()}); install onnxruntime-gpu first (NOTES.md, 'GPU run')")
    tdev = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    reps = {"query": 100 if cuda else 5, "warmup": 10 if cuda else 1, "batch": 30 if cuda else 2}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp) if keep is None else keep
        if keep is not None:
            for sub in ("checkpoint", "artifact"):  # a kept directory from an earlier run is replaced
                shutil.rmtree(keep / sub, ignore_errors=True)
            keep.mkdir(parents=True, exist_ok=True)
        say(f"[1/6] building {arch} with random weights (seed 0) ...")
        ckpt = materialise(arch, work / "checkpoint", seed=0)
        say("[2/6] exporting fp32 and fp16 ...")
        t_export = time.perf_counter()
        rc = export_main(["--model", str(ckpt), "--out", str(work / "artifact"), "--precision", "fp32,fp16",
                          "--query-instruction", INSTRUCTION])
        if rc != 0:
            raise SystemExit(f"export failed (exit {rc})")
        export_s = time.perf_counter() - t_export
        spec = resolve(str(ckpt), workdir=work)
        with warnings.catch_warnings():  # the dry run's fp16-on-CPU warning is expected there
            warnings.simplefilter("ignore" if dry_run else "default")
            emb = Embedder(work / "artifact", device="cuda" if cuda else "cpu", precision="fp16")
        say(f"[3/6] fp16 vs fp32 PyTorch reference on {tdev} ...")
        texts = check_texts(dry_run)
        ref = reference_fp32(spec, tdev, texts).astype(np.float64)
        nan_or_inf, detail = False, ""
        try:
            with warnings.catch_warnings():  # the check texts are cut at 512 tokens on purpose
                warnings.simplefilter("ignore", TruncationWarning)
                ours = emb.embed(texts).astype(np.float64)
        except ArithmeticError as exc:  # InvalidOutputError: NaN/inf or a non-unit row
            nan_or_inf, detail, ours = True, str(exc), np.full_like(ref, np.nan)
        cos = (ours * ref).sum(1)
        check = {"texts": len(texts), "min_cos_vs_fp32": float(np.nanmin(cos)) if not nan_or_inf else float("nan"),
                 "mean_cos_vs_fp32": float(np.nanmean(cos)) if not nan_or_inf else float("nan"),
                 "nan_or_inf": nan_or_inf, "detail": detail}
        say(f"      min cos {check['min_cos_vs_fp32']:.6f}, NaN/inf: {nan_or_inf}")

        say("[4/6] batch-1 query latency (text in, vector out) ...")
        torch_path = TorchFp16(spec, tdev, torch.float16 if cuda else torch.float32)
        queries = [INSTRUCTION + q for q in datasets.zh_queries()[: reps["query"]]]
        lat: dict[str, list[float]] = {"torch_fp16": [], "ours_fp16": []}
        for q in queries[: reps["warmup"]]:
            torch_path.embed_text([q])
            emb.embed([q], batch_size=1)
        for q in queries:  # interleaved, so both meet the same clocks and neighbours
            s = time.perf_counter()
            torch_path.embed_text([q])
            lat["torch_fp16"].append(time.perf_counter() - s)
            s = time.perf_counter()
            emb.embed([q], batch_size=1)
            lat["ours_fp16"].append(time.perf_counter() - s)
        query_tokens = float(np.mean([len(torch_path.tokenizer(q)["input_ids"]) for q in queries]))

        say("[5/6] throughput on fixed batches and the fp16 matrix peak ...")
        config = json.loads((ckpt / "config.json").read_text())
        peak = matmul_peak(tdev, torch.float16 if cuda else torch.float32, 8192 if cuda else 512, 20 if cuda else 3)
        rng = np.random.default_rng(0)
        throughput, raw_batches = {}, {}
        for n, length in SHAPES:
            ids = rng.integers(1000, config["vocab_size"], (n, length)).astype(np.int64)
            ids[:, 0] = 101
            mask = np.ones_like(ids)
            ops = model_ops(config, [length] * n)
            row = {}
            for name, fn in (("torch_fp16", torch_path.embed_tokens), ("ours_fp16", emb.embed_tokens)):
                secs = time_batches(fn, ids, mask, reps["warmup"] // 2 + 1, reps["batch"])
                raw_batches[f"{name} {n}x{length}"] = secs
                best = float(np.median(secs))
                row[name] = {"ms_per_batch": 1000 * best, "tokens_per_s": n * length / best,
                             "fraction_of_fp16_peak": ops / best / peak}
            throughput[f"{n}x{length}"] = row

        say("[6/6] onnxruntime profile of our graph, one 64 x 128 batch ...")
        n, length = SHAPES[0]
        ids = rng.integers(1000, config["vocab_size"], (n, length)).astype(np.int64)
        profile = profile_ours(work / "artifact" / emb.manifest.variants["fp16"].model_file,
                               "cuda" if cuda else "cpu", ids, np.ones_like(ids), 10 if cuda else 2)
        manifest_fp16 = emb.manifest.variants["fp16"]

    lat_summary = {k: percentiles(v) for k, v in lat.items()}
    first = f"{SHAPES[0][0]}x{SHAPES[0][1]}"
    result = {
        "device": card,
        "card": card_slug(card) if cuda else "cpu-dry-run",
        "dry_run": dry_run,
        "arch": arch,
        "torch_dtype": "float16" if cuda else "float32 (dry run on CPU)",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     "cuda": torch.version.cuda if cuda else None},
        "providers": emb.providers,
        "export_seconds": export_s,
        "fp16_export_validation": {f.name: getattr(manifest_fp16.parity, f.name) for f in fields(manifest_fp16.parity)
                                   if f.name != "quality"},
        "check": check,
        "min_cos_vs_fp32": check["min_cos_vs_fp32"],
        "query_tokens_mean": query_tokens,
        "latency": lat_summary,
        "throughput": throughput,
        "fp16_matmul_peak_tflops": peak / 1e12,
        "throughput_vs_torch_fp16": throughput[first]["ours_fp16"]["tokens_per_s"] / throughput[first]["torch_fp16"]["tokens_per_s"],
        "latency_vs_torch_fp16": lat_summary["ours_fp16"]["p50_ms"] / lat_summary["torch_fp16"]["p50_ms"],
        "profile_ours_fp16_64x128": profile,
        "raw": {"latency_s": lat, "batch_s": raw_batches},
        "total_seconds": time.perf_counter() - t0,
    }
    result["targets"] = {
        "throughput_vs_torch_fp16 >= 1.2": result["throughput_vs_torch_fp16"] >= TARGETS["throughput_vs_torch_fp16"],
        "latency_vs_torch_fp16 <= 0.5": result["latency_vs_torch_fp16"] <= TARGETS["latency_vs_torch_fp16"],
        "min_cos_vs_fp32 >= 0.999": bool(check["min_cos_vs_fp32"] >= TARGETS["min_cos_vs_fp32"]),
        "no NaN/inf": not nan_or_inf,
    }
    return result


def table(r: dict) -> str:
    lines = [
        f"{r['arch']} architecture (random weights) on {r['device']}; torch {r['versions']['torch']}, onnxruntime "
        f"{r['versions']['onnxruntime']}; matrix peak measured {r['fp16_matmul_peak_tflops']:.2f} TFLOP/s. "
        f"FP16 vs FP32 reference: min cosine {r['min_cos_vs_fp32']:.6f} over {r['check']['texts']} texts "
        f"(up to 512 tokens), NaN/inf: {'yes' if r['check']['nan_or_inf'] else 'none'}.",
        "",
        "| path | query p50 (ms) | query p99 (ms) | " + " | ".join(f"{s} tokens/s | {s} % peak" for s in r["throughput"]) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(r["throughput"]),
    ]
    labels = (("torch_fp16", "PyTorch fp32 on CPU (dry run)"), ("ours_fp16", "ours fp16, CPU provider (dry run)")) \
        if r["dry_run"] else (("torch_fp16", "PyTorch fp16 (SDPA)"), ("ours_fp16", "ours fp16 (onnxruntime CUDA)"))
    for name, label in labels:
        cells = [f"{r['latency'][name]['p50_ms']:.2f}", f"{r['latency'][name]['p99_ms']:.2f}"]
        for shape in r["throughput"].values():
            cells += [f"{shape[name]['tokens_per_s']:.0f}", f"{100 * shape[name]['fraction_of_fp16_peak']:.0f}%"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Throughput vs PyTorch fp16 (64x128): {r['throughput_vs_torch_fp16']:.2f}x (target >= 1.2); "
              f"batch-1 latency vs PyTorch fp16: {r['latency_vs_torch_fp16']:.2f}x (target <= 0.5)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny model, CPU provider, few repetitions")
    p.add_argument("--arch", default=None, help="architecture (default bge-large-zh; tiny-zh with --dry-run)")
    p.add_argument("--keep", type=Path, default=None,
                   help="write checkpoint/ and artifact/ (fp32, fp16) here and keep them (for benchmarks.serve "
                        "--device cuda --checkpoint DIR/checkpoint --artifact DIR/artifact)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args.out, args.dry_run, args.arch, args.keep)
    md = table(result)
    print(md)
    save(args.out, f"gpu-{result['card']}", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
