"""Anthropic's error object on /v1/messages: `{"type": "error", "error": {"type", "message"}}`,
with the statuses the chat route answers (so the `anthropic` SDK raises its own classes:
BadRequestError, AuthenticationError, RateLimitError, InternalServerError). Inside a stream the
same object is one `event: error`."""
from __future__ import annotations

from web.errors import ApiError
from web.openai.errors import client_status

MESSAGES_PREFIX = "/v1/messages"
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_object(error: ApiError, route: str) -> dict:
    status = client_status(error, route)
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def write_error(error: ApiError, route: str) -> tuple[dict, int]:
    return error_object(error, route), client_status(error, route)


def from_openai(body: dict) -> dict:
    """A chat stream's error chunk (`{"error": {"message", "type", ...}}`) in Anthropic's shape."""
    inner = body.get("error") or {}
    kind = inner.get("type") if inner.get("type") in _TYPES.values() else "api_error"  # server_error: ours
    return {"type": "error", "error": {"type": kind, "message": inner.get("message") or "generation failed"}}
