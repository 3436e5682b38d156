"""The embedding server: ``python -m runtime.serve --model NAME=DIR``.

OpenAI- (``POST /v1/embeddings``) and text-embeddings-inference-compatible (``POST /embed``) routes,
batching across requests, admission by queued tokens (429 with Retry-After), per-request deadlines,
an exact-match vector cache, Prometheus metrics and a graceful drain on SIGTERM. Needs the ``serve``
extra (starlette, uvicorn, orjson, prometheus-client); ``import runtime`` never imports this package.
"""

from .app import create_app
from .config import ModelSpec, ServeConfig, parse_args

__all__ = ["ModelSpec", "ServeConfig", "create_app", "parse_args"]
