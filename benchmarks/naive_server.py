"""The naive embedding servers the serving benchmark compares against, written the way a user writes them.

    python -m benchmarks.naive_server --backend st-torch|st-qint8|ours --model PATH --port N --threads T [--device cuda]

A plain FastAPI ``def`` endpoint that calls the model once per request (FastAPI runs it in its thread
pool), run by uvicorn with its default settings: no batching across requests, no admission control, no
queue limit. That is the baseline a serving layer has to beat, so it is deliberately not tuned.

Backends (``--model`` is what each one loads):

- ``st-torch``: sentence-transformers, torch backend, on a checkpoint directory.
- ``st-qint8``: sentence-transformers' qint8 ONNX recipe (plain export + optimum's avx512_vnni dynamic
  preset, rebuilt by ``benchmarks.stock``), run by onnxruntime through this project's tokenisation
  (``benchmarks.paths.OnnxFilePath``), because sentence-transformers' own ONNX backend needs optimum-onnx,
  which cannot be installed beside transformers 5. ``--model`` is the .onnx file, ``--tokenizer`` the
  tokenizer.json.
- ``ours``: ``runtime.Embedder(artifact, precision="int8")`` on an artifact directory.
- ``st-cross-torch``: sentence-transformers' ``CrossEncoder`` (torch) on a cross-encoder checkpoint: ``/rerank``.
- ``ours-rerank``: ``runtime.Reranker(artifact, precision="int8")``: ``/rerank``.

Route: ``POST /v1/embeddings``, OpenAI-shaped (``input``: a string or a list of strings), plus the
``input_type: "query"`` extension, which prepends the BGE retrieval instruction; for the rerank backends
``POST /rerank`` in TEI's shape (``query``, ``texts`` -> ``[{index, score}]`` best first, sigmoid scores).
``GET /health`` says ready.

``--device cuda`` (embedding backends ``st-torch`` and ``ours``): sentence-transformers in half precision
on the GPU, or the artifact's fp16 variant on onnxruntime's CUDA provider; still one call per request.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

BACKENDS = ("st-torch", "st-qint8", "ours", "st-cross-torch", "ours-rerank")
RERANK_BACKENDS = ("st-cross-torch", "ours-rerank")

Encoder = Callable[[list[str], bool], np.ndarray]
Scorer = Callable[[str, list[str]], np.ndarray]


class RerankRequest(BaseModel):
    """TEI's rerank request (the fields these servers read)."""

    query: str
    texts: list[str]
    raw_scores: bool = False


def st_cross_scorer(model: Path, threads: int) -> Scorer:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    ce = CrossEncoder(str(model), device="cpu", max_length=512)

    def score(query: str, texts: list[str]) -> np.ndarray:
        return np.asarray(ce.predict([(query, t) for t in texts], activation_fn=torch.nn.Identity()))

    return score


def ours_scorer(artifact: Path, threads: int) -> Scorer:
    from runtime import Reranker

    rr = Reranker(artifact, device="cpu", precision="int8", threads=threads)

    def score(query: str, texts: list[str]) -> np.ndarray:
        return rr.score([(query, t) for t in texts])

    return score


def build_rerank_app(score: Scorer):
    """The FastAPI rerank server a user would write: one scoring call per request."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/rerank")
    def rerank(req: RerankRequest) -> list[dict]:
        logits = np.asarray(score(req.query, req.texts), dtype=np.float64)
        scores = logits if req.raw_scores else 1 / (1 + np.exp(-logits))
        return [{"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")]

    return app


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request plus ``input_type``; module level so FastAPI can resolve it as the body."""

    input: str | list[str]
    model: str = "bge"
    input_type: Literal["query", "document"] | None = None


def st_torch_encoder(model: Path, threads: int, device: str = "cpu") -> Encoder:
    """On CUDA in half precision (what a GPU user of sentence-transformers runs), on the CPU in float32."""
    import torch
    from sentence_transformers import SentenceTransformer

    from export.architectures import BGE_ZH_INSTRUCTION

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(model), device=device)
    if device == "cuda":
        st.half()

    def encode(texts: list[str], query: bool) -> np.ndarray:
        if query:
            texts = [BGE_ZH_INSTRUCTION + t for t in texts]
        return st.encode(texts, normalize_embeddings=True)

    return encode


def st_qint8_encoder(model: Path, tokenizer: Path, threads: int) -> Encoder:
    from export.architectures import BGE_ZH_INSTRUCTION

    from .paths import OnnxFilePath

    path = OnnxFilePath("ST ONNX recipe int8", model, tokenizer, 512, 0, threads)

    def encode(texts: list[str], query: bool) -> np.ndarray:
        if query:
            texts = [BGE_ZH_INSTRUCTION + t for t in texts]
        return path.embed(texts)

    return encode


def ours_encoder(artifact: Path, threads: int, device: str = "cpu") -> Encoder:
    from runtime import Embedder

    emb = Embedder(artifact, device=device, precision="fp16" if device == "cuda" else "int8", threads=threads)

    def encode(texts: list[str], query: bool) -> np.ndarray:
        return emb.embed_queries(texts) if query else emb.embed(texts)

    return encode


def make_encoder(backend: str, model: Path, threads: int, tokenizer: Path | None = None,
                 device: str = "cpu") -> Encoder:
    if device == "cuda" and backend not in ("st-torch", "ours"):
        raise SystemExit(f"--device cuda serves st-torch (fp16) or ours (fp16), not {backend!r}")
    if backend == "st-torch":
        return st_torch_encoder(model, threads, device)
    if backend == "st-qint8":
        if tokenizer is None:
            raise SystemExit("--backend st-qint8 needs --tokenizer (the tokenizer.json to feed the graph)")
        return st_qint8_encoder(model, tokenizer, threads)
    if backend == "ours":
        return ours_encoder(model, threads, device)
    raise SystemExit(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def build_app(encode: Encoder):
    """The FastAPI app a user would write: one encode call per request, vectors as JSON lists."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> dict:
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = encode(texts, req.input_type == "query")
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": req.model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--model", required=True, type=Path, help="checkpoint dir, .onnx file or artifact dir")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (st-qint8 only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of the model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: st-torch in fp16, ours with the fp16 variant (embedding backends only)")
    args = p.parse_args(argv)
    import uvicorn

    if args.backend in RERANK_BACKENDS:
        scorer = st_cross_scorer if args.backend == "st-cross-torch" else ours_scorer
        app = build_rerank_app(scorer(args.model, args.threads))
    else:
        app = build_app(make_encoder(args.backend, args.model, args.threads, args.tokenizer, args.device))
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
