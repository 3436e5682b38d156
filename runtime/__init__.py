"""Thin BGE embedding and reranking runtime over onnxruntime and tokenizers (no torch, no transformers)."""

from .chunking import Chunks
from .embedder import Embedder, TruncationWarning
from .errors import (
    ArtifactError,
    EmbedderError,
    InputTooLongError,
    IntegrityError,
    InvalidOutputError,
    ProviderUnavailableError,
)
from .manifest import FileEntry, Manifest, PairFormat, Parity, Source, Variant
from .reranker import PairTruncationWarning, Reranker

__all__ = [
    "ArtifactError",
    "Chunks",
    "Embedder",
    "EmbedderError",
    "FileEntry",
    "InputTooLongError",
    "IntegrityError",
    "InvalidOutputError",
    "Manifest",
    "PairFormat",
    "PairTruncationWarning",
    "Parity",
    "ProviderUnavailableError",
    "Reranker",
    "Source",
    "TruncationWarning",
    "Variant",
]
__version__ = "0.1.0"
