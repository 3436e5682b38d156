"""Typed errors of the runtime. Each message says what failed and what to do next."""

from __future__ import annotations


class EmbedderError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ArtifactError(EmbedderError, ValueError):
    """The artifact directory or its manifest is missing, malformed or unsupported."""


class IntegrityError(ArtifactError):
    """A file does not match the sha256 recorded in the manifest, or points outside the artifact."""


class ProviderUnavailableError(EmbedderError, RuntimeError):
    """The requested execution provider (e.g. CUDA) is not what the session got."""


class InputTooLongError(EmbedderError, ValueError):
    """An input exceeds the model's max length and truncation was disabled."""

    def __init__(self, index: int, n_tokens: int, max_length: int, at_least: bool = False) -> None:
        self.index = index
        self.n_tokens = n_tokens  # a lower bound when ``at_least`` (the text was too large to count whole)
        self.max_length = max_length
        self.at_least = at_least
        super().__init__(
            f"input {index} has {'at least ' if at_least else ''}{n_tokens} tokens, more than the model's max length of {max_length}; "
            "shorten it, call embed(..., long_text='chunk') to embed all of it as overlapping windows, "
            "or embed(..., long_text='truncate') to keep its first tokens"
        )


class InvalidOutputError(EmbedderError, ArithmeticError):
    """The graph returned a non-finite or non-unit vector; never handed back silently."""

    def __init__(self, index: int, detail: str, precision: str) -> None:
        self.index = index
        super().__init__(
            f"embedding of input {index} is invalid ({detail}) with the {precision} variant; "
            "this is a numerical fault of the artifact: re-run with precision='fp32' and report the input"
        )
