"""Thin BGE embedding runtime over onnxruntime and tokenizers (no torch, no transformers)."""

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
from .manifest import FileEntry, Manifest, Parity, Source, Variant

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
    "Parity",
    "ProviderUnavailableError",
    "Source",
    "TruncationWarning",
    "Variant",
]
__version__ = "0.1.0"
