"""Drop-ins for code written against other libraries: change one import, keep the calls.

- ``FlagModel`` and ``FlagReranker`` (FlagEmbedding's, the BGE model cards' own library):
  ``runtime.compat.flagembedding``; ``BGEM3FlagModel`` (bge-m3's dense, sparse and ColBERT outputs):
  ``runtime.compat.bge_m3``.
- ``BGEOnnxEmbeddings`` (a LangChain ``Embeddings``) and ``BGEOnnxCrossEncoder`` (a LangChain
  ``BaseCrossEncoder``, for ``CrossEncoderReranker``): ``runtime.compat.langchain``, extra ``langchain``.
- ``BGEOnnxEmbedding`` (a LlamaIndex ``BaseEmbedding``) and ``BGEOnnxRerank`` (a LlamaIndex node
  postprocessor): ``runtime.compat.llamaindex``, extra ``llamaindex``.

The framework adapters are imported on first use, so ``import runtime.compat`` needs no framework.
"""

from __future__ import annotations

from typing import Any

from .bge_m3 import BGEM3FlagModel
from .flagembedding import FlagModel, FlagReranker

_LAZY = {"BGEOnnxEmbeddings": ".langchain", "BGEOnnxCrossEncoder": ".langchain", "BGEOnnxEmbedding": ".llamaindex",
         "BGEOnnxRerank": ".llamaindex"}

__all__ = ["BGEM3FlagModel", "BGEOnnxCrossEncoder", "BGEOnnxEmbedding", "BGEOnnxEmbeddings", "BGEOnnxRerank", "FlagModel", "FlagReranker"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
