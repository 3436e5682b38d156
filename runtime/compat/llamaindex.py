"""A LlamaIndex ``BaseEmbedding`` over the runtime, for ``VectorStoreIndex(..., embed_model=...)``.

    from runtime.compat.llamaindex import BGEOnnxEmbedding
    index = VectorStoreIndex(nodes, embed_model=BGEOnnxEmbedding("artifacts/bge-large-zh-v1.5"))

Needs ``llama-index-core`` (``pip install 'bge-onnx[llamaindex]'``), imported by this module only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

try:
    from llama_index.core.embeddings import BaseEmbedding
    from pydantic import PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "runtime.compat.llamaindex needs llama-index-core: pip install 'bge-onnx[llamaindex]'"
    ) from exc

from ..embedder import Embedder


class BGEOnnxEmbedding(BaseEmbedding):
    """Texts (nodes) are embedded as they are and queries with the manifest's query instruction.
    ``long_text`` and ``overlap`` are ``Embedder.embed``'s. Pass an ``Embedder`` to share one."""

    long_text: str = "truncate"
    overlap: int | None = None
    _embedder: Embedder = PrivateAttr()

    def __init__(
        self,
        model: str | Path | Embedder,
        *,
        embed_batch_size: int = 32,
        long_text: str = "truncate",
        overlap: int | None = None,
        **embedder_kwargs: Any,
    ) -> None:
        embedder = model if isinstance(model, Embedder) else Embedder(model, **embedder_kwargs)
        super().__init__(
            model_name=str(getattr(embedder, "_root", "bge-onnx")), embed_batch_size=embed_batch_size,
            long_text=long_text, overlap=overlap,
        )
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "BGEOnnxEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def _embed(self, texts: list[str], query: bool) -> list[list[float]]:
        fn = self._embedder.embed_queries if query else self._embedder.embed
        return fn(list(texts), long_text=self.long_text, overlap=self.overlap).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text], query=False)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts, query=False)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        """In a worker thread: the event loop keeps serving while the graph runs."""
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
