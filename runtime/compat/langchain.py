"""A LangChain ``Embeddings`` over the runtime: ``embed_documents`` / ``embed_query`` and their async pair.

    from runtime.compat.langchain import BGEOnnxEmbeddings
    store = InMemoryVectorStore(BGEOnnxEmbeddings("artifacts/bge-large-zh-v1.5"))

Needs ``langchain-core`` (``pip install 'bge-onnx[langchain]'``), imported by this module only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "runtime.compat.langchain needs langchain-core: pip install 'bge-onnx[langchain]'"
    ) from exc

from ..embedder import Embedder


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
