"""LangChain over the runtime: an ``Embeddings`` (``embed_documents`` / ``embed_query`` and their async pair)
and a ``BaseCrossEncoder`` for its ``CrossEncoderReranker`` document compressor.

    from runtime.compat.langchain import BGEOnnxCrossEncoder, BGEOnnxEmbeddings
    store = InMemoryVectorStore(BGEOnnxEmbeddings("artifacts/bge-large-zh-v1.5"))
    compressor = CrossEncoderReranker(model=BGEOnnxCrossEncoder("artifacts/bge-reranker-base"), top_n=3)

Needs ``langchain-core`` (``pip install 'bge-onnx[langchain]'``), imported by this module only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

try:
    from langchain_core.cross_encoders import BaseCrossEncoder
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "runtime.compat.langchain needs langchain-core: pip install 'bge-onnx[langchain]'"
    ) from exc

from ..embedder import Embedder
from ..reranker import Reranker


class BGEOnnxEmbeddings(Embeddings):
    """Documents are embedded as they are and queries with the manifest's query instruction (BGE's
    asymmetric retrieval). ``long_text`` and ``overlap`` are ``Embedder.embed``'s (``"chunk"`` embeds all of
    a long document instead of its first ``max_length`` tokens). Pass an ``Embedder`` to share one."""

    def __init__(
        self,
        model: str | Path | Embedder,
        *,
        batch_size: int | None = None,
        long_text: str = "truncate",
        overlap: int | None = None,
        **embedder_kwargs: Any,
    ) -> None:
        self.embedder = model if isinstance(model, Embedder) else Embedder(model, **embedder_kwargs)
        self.batch_size = batch_size
        self.long_text = long_text
        self.overlap = overlap

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector (a list of floats, as LangChain wants) per document."""
        vectors = self.embedder.embed(
            list(texts), batch_size=self.batch_size, long_text=self.long_text, overlap=self.overlap
        )
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        """The query's vector, with the manifest's query instruction prepended."""
        vectors = self.embedder.embed_queries(
            [text], batch_size=self.batch_size, long_text=self.long_text, overlap=self.overlap
        )
        return vectors[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` in a worker thread: the event loop keeps serving while the graph runs."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)


class BGEOnnxCrossEncoder(BaseCrossEncoder):
    """``score(pairs)`` by a cross-encoder artifact (bge-reranker): raw logits, or their sigmoid with
    ``normalize=True``; pairs cut as ``Reranker.score`` cuts them. Pass a ``Reranker`` to share one."""

    def __init__(self, model: str | Path | Reranker, *, normalize: bool = False, batch_size: int | None = None,
                 **reranker_kwargs: Any) -> None:
        self.reranker = model if isinstance(model, Reranker) else Reranker(model, **reranker_kwargs)
        self.normalize = normalize
        self.batch_size = batch_size

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        import warnings

        from ..reranker import PairTruncationWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PairTruncationWarning)  # cutting long passages is the expected use
            scores = self.reranker.score([tuple(p) for p in text_pairs], self.batch_size, normalize=self.normalize)
        return scores.astype(float).tolist()
