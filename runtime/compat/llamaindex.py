"""LlamaIndex over the runtime: a ``BaseEmbedding`` for ``VectorStoreIndex(..., embed_model=...)`` and a node
postprocessor that reranks retrieved nodes with a cross-encoder artifact.

    from runtime.compat.llamaindex import BGEOnnxEmbedding, BGEOnnxRerank
    index = VectorStoreIndex(nodes, embed_model=BGEOnnxEmbedding("artifacts/bge-large-zh-v1.5"))
    engine = index.as_query_engine(node_postprocessors=[BGEOnnxRerank("artifacts/bge-reranker-base", top_n=3)])

Needs ``llama-index-core`` (``pip install 'bge-onnx[llamaindex]'``), imported by this module only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

try:
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
    from pydantic import PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "runtime.compat.llamaindex needs llama-index-core: pip install 'bge-onnx[llamaindex]'"
    ) from exc

from ..embedder import Embedder
from ..reranker import Reranker


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


class BGEOnnxRerank(BaseNodePostprocessor):
    """Scores each retrieved node against the query with a cross-encoder artifact and keeps the ``top_n``
    best, as LlamaIndex's ``SentenceTransformerRerank`` does (node scores become the reranker's: raw logits,
    or their sigmoid with ``normalize=True``). Pass a ``Reranker`` to share one."""

    top_n: int = 2
    normalize: bool = False
    keep_retrieval_score: bool = False
    _reranker: Reranker = PrivateAttr()

    def __init__(self, model: str | Path | Reranker, *, top_n: int = 2, normalize: bool = False,
                 keep_retrieval_score: bool = False, **reranker_kwargs: Any) -> None:
        super().__init__(top_n=top_n, normalize=normalize, keep_retrieval_score=keep_retrieval_score)
        self._reranker = model if isinstance(model, Reranker) else Reranker(model, **reranker_kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "BGEOnnxRerank"

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        import warnings

        from ..reranker import PairTruncationWarning

        if query_bundle is None:
            raise ValueError("BGEOnnxRerank needs the query: call postprocess_nodes(nodes, query_str=...)")
        if not nodes:
            return []
        pairs = [(query_bundle.query_str, n.node.get_content(metadata_mode=MetadataMode.EMBED)) for n in nodes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PairTruncationWarning)
            scores = self._reranker.score(pairs, normalize=self.normalize)
        for node, score in zip(nodes, scores):
            if self.keep_retrieval_score:
                node.node.metadata["retrieval_score"] = node.score
            node.score = float(score)
        return sorted(nodes, key=lambda n: -(n.score or 0.0))[: self.top_n]
