"""Typed errors of the export stage; the CLI prints their message as one paragraph, no traceback."""

from __future__ import annotations


class ExportError(Exception):
    """Base class of errors the export stage raises on purpose."""


class SourceModelError(ExportError):
    """The checkpoint could not be found, downloaded or understood."""


class FusionError(ExportError):
    """onnxruntime's transformer optimizer did not fuse the graph as expected."""


class GateError(ExportError):
    """One or more variants failed their parity gate; the passing ones were still written."""


class OutputDirError(ExportError):
    """The output directory cannot be written."""


class ChildProcessFailedError(ExportError):
    """The child process a large model's export step runs in died (memory, or it could not start)."""
