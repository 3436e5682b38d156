"""Typed errors of bulk embedding. Each message says what went wrong and what to do next."""

from __future__ import annotations

from ..errors import EmbedderError


class BulkError(EmbedderError):
    """Base class of every error ``runtime.bulk`` raises on purpose."""


class BulkConfigError(BulkError, ValueError):
    """An argument or option cannot be honoured (unknown format, missing column, bad sink address)."""


class OutputMismatchError(BulkError, ValueError):
    """The output already holds vectors of another model, precision or input: refused, never mixed."""
