"""`python -m export`: command-line front end of the export stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from .architectures import ARCHITECTURES
from .errors import ExportError, GateError
from .pipeline import PRECISION_ORDER
from .report import Progress, table

DEFAULT_MODEL = "BAAI/bge-large-zh-v1.5"


def parse_precisions(value: str) -> tuple[str, ...]:
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PRECISION_ORDER]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"precisions must be a comma list of {','.join(PRECISION_ORDER)}, got {value!r}")
    return tuple(p for p in PRECISION_ORDER if p in chosen)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a BERT-family embedding model (BGE by default) or a cross-encoder reranker (bge-reranker) "
                    "to validated ONNX artifacts.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint directory (default: %(default)s)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to download")
    p.add_argument("--random-init", choices=sorted(ARCHITECTURES), default=None,
                   help="build this architecture with seeded random weights instead of loading --model (offline; "
                        "speed and plumbing only, the vectors mean nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write (replaced atomically)")
    p.add_argument("--precision", type=parse_precisions, default=PRECISION_ORDER,
                   help="comma list of fp32,fp16,int8 (default: all three)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per text, or per (query, passage) pair for a reranker (default: the model's; "
                        "rerankers 512 at most, as FlagReranker)")
    p.add_argument("--query-max-length", type=int, default=None,
                   help="rerankers: the query's tokens are cut to this before pairing (default: 3/4 of max length, "
                        "as FlagReranker)")
    p.add_argument("--query-instruction", default=None,
                   help="text prepended by embed_queries (default: BGE's instruction for BGE models, else empty)")
    p.add_argument("--pooling", choices=("cls", "mean"), default=None,
                   help="default: the checkpoint's sentence-transformers pooling config, else cls")
    p.add_argument("--validate-with", type=Path, default=None, metavar="TSV",
                   help="labelled pairs (sentence1, sentence2, score): each variant must keep its share of the "
                        "reference's Spearman (fp32 99.99%%, fp16 99.9%%, int8 99.5%%) or it is refused")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="L2-normalise the output (default: from the checkpoint's Normalize module; on for BGE)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from .labelled import load_pairs
    from .pipeline import run_export
    from .publish import publish, staging
    from .source import resolve

    progress = Progress(total=4 + len(args.precision) + (1 if "fp32" not in args.precision else 0))
    try:
        labelled = load_pairs(args.validate_with) if args.validate_with else None
        with tempfile.TemporaryDirectory(prefix="bge-source-") as tmp:
            with progress.step("resolving the checkpoint"):
                spec = resolve(
                    args.model,
                    revision=args.revision,
                    random_init=args.random_init,
                    workdir=Path(tmp),
                    pooling=args.pooling,
                    normalize=args.normalize,
                    max_length=args.max_length,
                    query_instruction=args.query_instruction,
                    seed=args.seed,
                    query_max_length=args.query_max_length,
                )
            if spec.random_weights:
                progress.say(
                    f"!! RANDOM WEIGHTS: {spec.name} is built with seeded random weights (seed {args.seed}); "
                    "use it for speed and plumbing tests only, its vectors mean nothing !!"
                )
            if spec.kind == "reranker":
                progress.say(f"   kind=reranker max_length={spec.max_length} query_max_length={spec.query_max_length}")
            else:
                progress.say(
                    f"   pooling={spec.pooling} normalize={spec.normalize} max_length={spec.max_length} "
                    f"query_instruction={spec.query_instruction!r}"
                )
            with staging(args.out) as stage:
                result = run_export(spec, args.out, args.precision, progress, stage, labelled)
                if result.manifest is not None:
                    publish(stage, args.out)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(table(result.rows))
    if result.manifest is not None:
        print(f"\nwrote {args.out.resolve()} ({', '.join(result.manifest.variants)})")
    if result.failed:
        err = GateError(
            f"variant(s) {', '.join(result.failed)} failed their parity gate and were left out of the manifest"
        )
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
