"""The export, end to end: checkpoint -> traced graph -> fused FP32 -> FP16 / INT8 -> validation ->
manifest. Returns what was built and how close each variant came to the reference."""

from __future__ import annotations

import datetime as _dt
import gc
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from runtime.errors import EmbedderError
from runtime.integrity import sha256_file
from runtime.manifest import (MANIFEST_NAME, SCHEMA_VERSION, FileEntry, M3Heads, Manifest, PairFormat, Parity, Source,
                              Variant)

from . import graph, long_attention, onnx_io, optimize, precision, probes, quantize, row_windows
from .errors import ChildProcessFailedError, FusionError
from .report import Progress, Row
from .source import ModelSpec
from .labelled import QUALITY_GATES, LabelledPairs, pair_spearman, spearman
from .validate import GATES, M3_GATES, m3_failures, m3_figures, parity, ranking_figures, ranking_gates, ranking_passes

PRECISION_ORDER = ("fp32", "fp16", "int8")
FILENAMES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
PROVIDER = {"fp32": "CPUExecutionProvider", "fp16": "CUDAExecutionProvider", "int8": "CPUExecutionProvider"}
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ExportResult:
    manifest: Manifest | None
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [r.variant for r in self.rows if r.status.startswith("FAIL")]


def _entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), size_bytes=path.stat().st_size)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    from . import __version__

    return {
        "export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
    }


def save_tokenizer(tokenizer, max_length: int, path: Path) -> int:
    """Write the fast tokenizer with the truncation and padding the graph expects; return the pad id."""
    from tokenizers import Tokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the checkpoint has no fast tokenizer; tokenizer.json cannot be written")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad_token = tokenizer.pad_token or "[PAD]"
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(pad_id=pad_id, pad_token=pad_token)
    backend.save(str(path))
    return int(pad_id)


def calibration_feeds(tokenizer_path: Path, max_length: int, pad_id: int, n_texts: int) -> list[dict[str, np.ndarray]]:
    """Calibration batches tokenised and padded exactly as the runtime will do it."""
    from runtime.batching import make_batches
    from runtime.tokenizer import TextTokenizer

    enc = TextTokenizer(tokenizer_path, max_length).encode(quantize.calibration_texts(n_texts))
    return [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        for b in make_batches(enc.ids, enc.lengths, pad_id, batch_size=16, max_batch_tokens=16 * max_length)
    ]


def pair_calibration_feeds(tokenizer_path: Path, max_length: int, query_max_length: int, pad_id: int,
                           n_pairs: int, token_types: bool) -> list[dict[str, np.ndarray]]:
    """Calibration batches of (query, passage) pairs, tokenised and padded as the Reranker does it: sentence
    pairs from the calibration text (as STS-B pairs them), and short texts against the long documents, so the
    ranges cover both a short pair and one the passage side fills to max length."""
    from runtime.batching import make_batches
    from runtime.pairs import PairTokenizer, segment_ids

    texts = quantize.calibration_texts(n_pairs)
    short = [t for t in texts if t and len(t) < 400]
    long = [t for t in texts if len(t) >= 400]
    pairs = [(short[i], short[i + 1]) for i in range(0, len(short) - 1, 2)]
    pairs += [(short[i], long[i % len(long)]) for i in range(0, len(short), 7)] if long else []
    pairs += [("", short[0]), (short[1], "")]
    enc = PairTokenizer(tokenizer_path, max_length, query_max_length).encode(pairs[:n_pairs])
    feeds = []
    for b in make_batches(enc.ids, enc.lengths, pad_id, batch_size=16, max_batch_tokens=16 * max_length):
        feed = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        if token_types:
            feed["token_type_ids"] = segment_ids(enc.lengths[b.indices], [enc.segment_start[i] for i in b.indices],
                                                 b.input_ids.shape)
        feeds.append(feed)
    return feeds


ISOLATE_BYTES = 1 << 30  # traced graphs past this (bge-large and up) run fusion, FP16 and INT8 in child processes


def _run(isolate: bool, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` here, or in a fresh (spawned) child process whose memory is returned when it ends.

    A child that dies (killed for memory, or unable to start: a spawned child re-imports the caller's main
    module, which a program read from standard input does not have) raises ChildProcessFailedError. A
    ``multiprocessing.Pool`` would start a new worker and wait for ever: seen on a GPU machine where the
    export was driven by ``python3 - <<EOF``, the pool respawned failing workers until the call's time ran out."""
    if not isolate:
        return fn(*args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            raise ChildProcessFailedError(
                f"the child process running {fn.__name__} for this large model died (killed for lack of memory, or "
                "it could not start: spawned children re-import the main module, so run the export as "
                "`python -m export` or from a script file, not from standard input or an interactive session); "
                "free memory and run the export again"
            ) from exc


def _fuse_to_file(traced: Path, dst: Path, heads: int, hidden: int, layers: int) -> tuple[list[Path], dict[str, int]]:
    fused, counts = optimize.fuse(traced, heads=heads, hidden=hidden, layers=layers)
    return onnx_io.save(fused, dst, keep=False), counts


def _fp16_to_file(fp32_path: Path, dst: Path) -> tuple[list[Path], dict[str, Any]]:
    import onnx

    m16, info = precision.to_fp16(onnx.load(str(fp32_path)))
    return onnx_io.save(m16, dst, keep=False), info


def _long_input_graph(src: Path, dst: Path) -> tuple[list[Path], int, int]:
    """Long-context models: flash attention for unpadded batches and each layer's tail over row windows
    (export/long_attention.py, export/row_windows.py); the files written and the layers each rewrite took."""
    import onnx

    model = onnx.load(str(src))
    flash = long_attention.flash_when_unpadded(model)
    windowed, left = row_windows.windowed_tails(model)
    if left:
        raise FusionError(f"{left} layer tails of {src.name} are not row-wise as export/row_windows.py expects; "
                          "this graph's layer structure is new to the exporter (report it with the model id)")
    return onnx_io.save(model, dst, keep=False), flash, windowed


def _validation_device(name: str) -> str:
    from runtime.providers import cuda_available

    return "cuda" if name == "fp16" and cuda_available() else "cpu"


def run_export(
    spec: ModelSpec,
    out: Path,
    precisions: tuple[str, ...],
    progress: Progress,
    stage: Path,
    labelled: LabelledPairs | None = None,
) -> ExportResult:
    """Build every requested variant into ``stage``; the caller publishes ``stage`` as ``out``."""
    from .reference import ReferenceEmbedder, ReferenceM3, ReferenceReranker, load_m3_heads, load_model, load_tokenizer

    cfg = spec.config
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    reranker = spec.kind == "reranker"
    groups = probes.rerank_groups() if reranker else []
    m3_heads = None
    m3_reference: tuple[list[dict[int, float]], list[np.ndarray]] | None = None
    skip_ids: tuple[int, ...] = ()
    what = (f"reference scores of {sum(map(len, groups))} probe pairs" if reranker
            else f"reference vectors on {len(probes.PROBES)} probe texts")
    with tempfile.TemporaryDirectory(prefix="bge-export-") as tmp:
        work = Path(tmp)
        with progress.step(f"loading {spec.name} and computing {what}"):
            model = load_model(spec, attn_implementation="eager")
            tokenizer = load_tokenizer(spec)
            quality_ref = None
            if reranker:
                ref_reranker = ReferenceReranker(spec, model=model, tokenizer=tokenizer)
                reference: Any = [ref_reranker.score(g) for g in groups]
                if labelled is not None:
                    quality_ref = spearman(ref_reranker.score(labelled.pairs, batch_size=32), labelled.score)
                del ref_reranker
            else:
                ref_embedder = ReferenceEmbedder(spec, model=model, tokenizer=tokenizer)
                reference = ref_embedder.embed(list(probes.PROBES))
                if spec.m3:
                    m3_heads = load_m3_heads(spec)
                    ref_m3 = ReferenceM3(spec, model=model, tokenizer=tokenizer, heads=m3_heads)
                    _, ref_lexical, ref_colbert = ref_m3.encode(list(probes.PROBES))
                    m3_reference = (ref_lexical, ref_colbert)
                    skip_ids = tuple(sorted(ref_m3.skip))
                    del ref_m3
                if labelled is not None:
                    quality_ref = pair_spearman(ref_embedder.embed(labelled.texts, batch_size=32), labelled)
                del ref_embedder
            if quality_ref is not None:
                progress.say(f"      reference Spearman on {labelled.name}: {quality_ref:.5f}")  # type: ignore[union-attr]
        inside = ("the classification head inside: one logit per pair" if reranker
                  else "dense, sparse and ColBERT outputs" if spec.m3 else "pooling and normalisation inside")
        with progress.step(f"exporting the ONNX graph ({inside})"):
            traced = work / "traced.onnx"
            names = graph.export_onnx(model, spec.pooling, spec.normalize, traced, kind=spec.kind, heads=m3_heads)
            del model
        # a large model's heavy steps run in a child process each, so their peaks do not stack on each other
        # or on what the parent still holds (bge-m3: the INT8 step was killed at 22.9 GB on a 24 GB machine)
        # (past 2 GiB torch writes each weight to a file of its own beside the graph: count the whole directory)
        isolate = sum(f.stat().st_size for f in work.iterdir() if f.is_file()) > ISOLATE_BYTES
        gc.collect()
        with progress.step("fusing with onnxruntime's transformer optimizer"
                           + (" (in a child process: large model)" if isolate else "")):
            fp32_files, fused_counts = _run(isolate, _fuse_to_file, traced, work / FILENAMES["fp32"], heads, hidden,
                                            layers)
        pad_id = save_tokenizer(tokenizer, spec.max_length, stage / TOKENIZER_FILE)
        built: dict[str, tuple[list[Path], dict[str, Any], dict[str, int]]] = {}
        # long-context models: CPU flash attention for unpadded batches (export/long_attention.py), FP32 and INT8
        long = spec.max_length > long_attention.APPLIES_PAST
        if "fp32" in precisions:
            info32: dict[str, Any] = {"fusions": "onnxruntime.transformers bert"}
            if long:
                files32, info32["flash_attention_layers"], info32["row_window_layers"] = _run(
                    isolate, _long_input_graph, fp32_files[0], stage / FILENAMES["fp32"])
            else:
                for f in fp32_files:
                    shutil.copy2(f, stage / f.name)
                files32 = [stage / f.name for f in fp32_files]
            built["fp32"] = (files32, info32, fused_counts)
        if "fp16" in precisions:
            with progress.step("converting to FP16 (pooling and normalisation kept in FP32)"):
                files16, info = _run(isolate, _fp16_to_file, fp32_files[0], stage / FILENAMES["fp16"])
                built["fp16"] = (files16, info, fused_counts)
        if "int8" in precisions:
            with progress.step("quantising to INT8 (calibrate, smooth, split outlier channels, greedy on calibration cosine)"):
                dst = stage / FILENAMES["int8"]
                if reranker:
                    # random weights: the scores' agreement is amplified rounding noise (why the ranking gate is
                    # off for them), so handing products back to float32 chases nothing; one round (a trained
                    # reranker's greedy may keep some in float32: its INT8 graph can be slower than this one)
                    opts = quantize.Int8Options(agreement="score_pearson", greedy=not spec.random_weights)
                    feeds = pair_calibration_feeds(stage / TOKENIZER_FILE, spec.max_length, spec.query_max_length,
                                                   pad_id, opts.calibration_texts, "token_type_ids" in names)
                else:
                    # bge-m3: 8-bit weights, 7-bit activations (its per-token outputs need the weight bit; see
                    # export/quantize.py); other embedders keep the 7-bit weights they were measured with
                    opts = (quantize.Int8Options(reduce_range=False, activation_levels=127) if spec.m3
                            else quantize.Int8Options())
                    feeds = calibration_feeds(stage / TOKENIZER_FILE, spec.max_length, pad_id, opts.calibration_texts)
                info = _run(isolate, quantize.quantize_int8, fp32_files[0], dst, feeds, opts)
                files8 = [f for f in (dst, dst.with_name(dst.name + ".data")) if f.exists()]
                if long:
                    files8, info["flash_attention_layers"], info["row_window_layers"] = _run(
                        isolate, _long_input_graph, dst, dst)
                built["int8"] = (files8, info, fused_counts)
                measure = "logit Pearson" if reranker else "min cosine"
                progress.say(f"      FFN up-projections split: {len(info['split_ffn_up_nodes'])}; kept in float32: "
                             f"{info['float32_nodes'] or 'none'}; calibration {measure} {info['calibration_min_cosine_vs_fp32']}")

    variants = {
        name: Variant(
            precision=name,
            model_file=files[0].name,
            files=tuple(_entry(stage, f) for f in files),
            execution_provider=PROVIDER[name],
            parity=Parity(validated=False, gate_min_cosine=None if reranker else GATES[name]),
            fused_operators=counts,
            build=info,
        )
        for name, (files, info, counts) in built.items()
    }
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        source=Source(
            model=spec.name,
            revision=spec.revision,
            local_path=spec.local,
            random_weights=spec.random_weights,
            architecture=spec.architecture,
        ),
        pooling=spec.pooling,
        normalize=spec.normalize,
        max_length=spec.max_length,
        query_instruction=spec.query_instruction,
        dimension=1 if reranker else int(hidden),
        input_names=tuple(names),
        output_name=graph.SCORE_NAME if reranker else graph.OUTPUT_NAME,
        opset=graph.OPSET,
        tokenizer=_entry(stage, stage / TOKENIZER_FILE),
        pad_token_id=pad_id,
        variants=variants,
        versions=_versions(),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        kind=spec.kind,
        pair=PairFormat(query_max_length=spec.query_max_length, token_type_ids="token_type_ids" in names)
        if reranker else None,
        m3=M3Heads(sparse_output=graph.SPARSE_NAME, colbert_output=graph.COLBERT_NAME,
                   colbert_dim=int(m3_heads[0].out_features), skip_token_ids=skip_ids) if m3_heads is not None else None,
    )
    (stage / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")

    rows, checked = [], {}
    with progress.step(f"validating {', '.join(variants)} against the PyTorch reference"):
        for name in variants:
            if reranker:
                row, par = _validate_reranker(stage, name, variants[name], groups, reference, labelled, quality_ref,
                                              spec.random_weights)
            else:
                row, par = _validate(stage, name, variants[name], reference, labelled, quality_ref, m3_reference)
            rows.append(row)
            if not row.status.startswith("FAIL"):
                checked[name] = replace(variants[name], parity=par)
            else:
                for f in variants[name].files:
                    (stage / f.path).unlink()
    final = replace(manifest, variants=checked) if checked else None
    if final is not None:
        (stage / MANIFEST_NAME).write_text(final.to_json(), encoding="utf-8")
    else:
        (stage / MANIFEST_NAME).unlink()
    return ExportResult(manifest=final, rows=rows)


T = TypeVar("T")


def _run_variant(name: str, outputs: Callable[[], T]) -> tuple[T | None, str]:
    """``outputs()`` with the expected warnings (fp16 on CPU, truncation) silenced. An fp16 variant that the
    CPU provider cannot run (no CUDA here) is not an error: it gives None and the note to record instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return outputs(), ""
    except (EmbedderError, RuntimeError) as exc:
        if name != "fp16":
            raise
        return None, f"not validated: no CUDA, and the CPU provider could not run it ({type(exc).__name__})"


def _quality(name: str, labelled: LabelledPairs, rho: float, quality_ref: float) -> dict[str, Any]:
    """The labelled-pairs figure of a variant: its Spearman to the gold scores as a share of the reference's."""
    ratio = rho / quality_ref if quality_ref else float("nan")
    return {"dataset": labelled.name, "pairs": len(labelled.first), "spearman": rho,
            "reference_spearman": quality_ref, "ratio": ratio, "gate_ratio": QUALITY_GATES[name]}


def _validate(
    stage: Path,
    name: str,
    variant: Variant,
    reference: np.ndarray,
    labelled: LabelledPairs | None,
    quality_ref: float | None,
    m3_reference: tuple[list[dict[int, float]], list[np.ndarray]] | None = None,
) -> tuple[Row, Parity]:
    """Dense vectors: min cosine to the reference's over the probe texts (and the Spearman share with labelled
    pairs). bge-m3: also the sparse and ColBERT outputs (``validate.m3_figures``), gated by ``M3_GATES``."""
    from runtime import Embedder

    gate = GATES[name]
    device = _validation_device(name)
    size = variant.size_bytes

    def outputs() -> tuple[np.ndarray, np.ndarray | None, Any]:
        emb = Embedder(stage, device=device, precision=name)
        vectors = emb.embed(list(probes.PROBES), batch_size=8)
        labelled_vectors = emb.embed(labelled.texts, batch_size=32) if labelled is not None else None
        heads_out = (emb.encode(list(probes.PROBES), batch_size=8, dense=False, sparse=True, colbert=True)
                     if m3_reference is not None else None)
        return vectors, labelled_vectors, heads_out

    got, not_run = _run_variant(name, outputs)
    if got is None:
        par = Parity(validated=False, gate_min_cosine=gate, note=not_run)
        return Row(name, variant.model_file, size, None, None, None, gate, not_run), par
    vectors, labelled_vectors, heads_out = got
    fig = parity(vectors, reference)
    passed = fig.min_cosine >= gate
    m3: dict[str, Any] = {}
    m3_missed: list[str] = []
    if heads_out is not None and m3_reference is not None:
        m3 = m3_figures(heads_out.sparse, heads_out.colbert, *m3_reference)  # type: ignore[arg-type]
        m3_missed = m3_failures(name, m3)
        passed = passed and not m3_missed
        m3["gates"] = M3_GATES[name]
    quality: dict[str, Any] = {}
    if labelled is not None and labelled_vectors is not None and quality_ref is not None:
        quality = _quality(name, labelled, pair_spearman(labelled_vectors, labelled), quality_ref)
        passed = passed and quality["ratio"] >= QUALITY_GATES[name]
    par = Parity(
        validated=True,
        min_cosine=fig.min_cosine,
        mean_cosine=fig.mean_cosine,
        max_abs_diff=fig.max_abs_diff,
        n_texts=fig.n_texts,
        gate_min_cosine=gate,
        device=device,
        note="" if device == "cuda" or name != "fp16" else "validated on the CPU provider; intended for CUDA",
        quality=quality,
        m3=m3,
    )
    status = "pass" if passed else "FAIL" + (f" (bge-m3 heads: {'; '.join(m3_missed)})" if m3_missed else "")
    row = Row(name, variant.model_file, size, fig.min_cosine, fig.mean_cosine, fig.max_abs_diff, gate, status,
              quality.get("ratio"))
    return row, par


def _validate_reranker(
    stage: Path,
    name: str,
    variant: Variant,
    groups: list[list[tuple[str, str]]],
    reference: list[np.ndarray],
    labelled: LabelledPairs | None,
    quality_ref: float | None,
    random_weights: bool = False,
) -> tuple[Row, Parity]:
    """FP32/FP16: the reference's logits within a tight tolerance; INT8: the ranking gate (each probe query's
    passages in the reference's order: Kendall tau, top-3 overlap; sigmoid score error). With labelled pairs,
    the Spearman of the scores to the gold scores, as a share of the reference's.

    Random weights: FP32 is gated as always (exactness does not depend on the weights); FP16 and INT8 are
    measured and recorded but not gated. A random encoder gives every input nearly the same first-token state
    (its variation across the probe pairs is 0.7% of its norm at tiny size, 11% for the bge-reranker-base
    architecture), so any head that spreads the scores must amplify that small difference, and rounding
    error with it: the figures say nothing about a trained reranker. Trained weights are gated (the
    fine-tuned MiniLM cross-encoder in the tests and benchmarks/quality_rerank.py)."""
    from runtime import Reranker

    device = _validation_device(name)
    size = variant.size_bytes

    def outputs() -> tuple[list[np.ndarray], np.ndarray | None]:
        rr = Reranker(stage, device=device, precision=name)
        scores = [rr.score(g, batch_size=8) for g in groups]
        return scores, rr.score(labelled.pairs, batch_size=32) if labelled is not None else None

    got, not_run = _run_variant(name, outputs)
    if got is None:
        return Row(name, variant.model_file, size, None, None, None, 0.0, not_run), Parity(validated=False, note=not_run)
    scores, labelled_scores = got
    fig = ranking_figures(scores, reference)
    gated = name == "fp32" or not random_weights
    passed = ranking_passes(name, fig) or not gated
    quality: dict[str, Any] = {}
    if labelled is not None and labelled_scores is not None and quality_ref is not None:
        quality = _quality(name, labelled, spearman(labelled_scores, labelled.score), quality_ref)
        passed = passed and quality["ratio"] >= QUALITY_GATES[name]
    par = Parity(
        validated=True,
        max_abs_diff=fig["max_abs_logit_diff"],
        n_texts=int(fig["pairs"]),
        device=device,
        note=("" if device == "cuda" or name != "fp16" else "validated on the CPU provider; intended for CUDA; ")
        + ("" if gated else "random weights: measured, not gated (see export/pipeline.py _validate_reranker)"),
        quality=quality,
        ranking={**fig, "gates": ranking_gates(name) if gated else {}},
    )
    gates = ranking_gates(name)
    row = Row(name, variant.model_file, size, None, None, fig["max_abs_logit_diff"],
              gates.get("max_abs_logit_diff", gates.get("min_kendall_tau", 0.0)),
              ("pass" if passed else "FAIL") if gated else "not gated: random weights",
              quality.get("ratio"), kendall_min=fig["min_kendall_tau"], top3=fig["mean_top3_overlap"],
              sigmoid_error=fig["max_sigmoid_error"])
    return row, par
