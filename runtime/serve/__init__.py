"""The embedding server: ``python -m runtime.serve --model NAME=DIR``.

OpenAI- (``POST /v1/embeddings``) and text-embeddings-inference-compatible (``POST /embed``) routes,
batching across requests, admission by queued tokens (429 with Retry-After), per-request deadlines,
an exact-match vector cache, Prometheus metrics and a graceful drain on SIGTERM. Needs the ``serve``
extra (starlette, uvicorn, orjson, prometheus-client); ``import runtime`` never imports this package.
"""

from importlib.util import find_spec

_missing = [m for m in ("starlette", "uvicorn", "orjson", "prometheus_client") if find_spec(m) is None]
if _missing:
    raise ImportError(
        f"the server needs the `serve` extra ({', '.join(_missing)} not installed): "
        "pip install -e '.[cpu,serve]' (or '.[gpu,serve]')"
    )

from .app import create_app  # noqa: E402
from .config import ModelSpec, ServeConfig, parse_args  # noqa: E402

__all__ = ["ModelSpec", "ServeConfig", "create_app", "parse_args"]
