"""HTTP errors of the server, always rendered in OpenAI's error body (``{"error": {...}}``)."""

from __future__ import annotations

from runtime.errors import EmbedderError


class ApiError(Exception):
    """An error answer: status, OpenAI error ``type``, the offending field (``param``) and a short ``code``.

    The message names the bad field or index and the limit it broke, so a client can fix its request
    without reading our source."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None, code: str = "request_too_large") -> ApiError:
    return ApiError(413, message, param=param, code=code)


class QueueFull(Exception):
    """Admission refused: the queue already holds more work than drains within the queue-time budget."""

    def __init__(self, retry_after_s: int, reason: str) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.reason = reason


class WarmUpError(EmbedderError, RuntimeError):
    """A warm-up run failed at start-up (on CUDA, most often: the largest batch does not fit in GPU memory)."""
