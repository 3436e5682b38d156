"""Export BERT-family embedding models (BGE by default) to validated ONNX artifacts with a manifest."""

__version__ = "0.1.0"

from .errors import ExportError, FusionError, GateError, OutputDirError, SourceModelError  # noqa: E402

__all__ = ["ExportError", "FusionError", "GateError", "OutputDirError", "SourceModelError", "__version__"]
