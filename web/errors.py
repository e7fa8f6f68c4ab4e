"""TGI's ErrorResponse `{error, error_type}`: one exception class per error_type, and the
handlers that turn every HTTP error (ours, Flask's, webargs') into that JSON shape. Each error
also carries a `reason` (common.protocol.FailureReason) for metrics and logs, never sent, and the
request field it is about (`param`) where known.

Routes under a prefix given to `register_error_handlers` write their errors their own way (the
OpenAI routes: `web.openai.errors`); the statuses and classes here stay TGI's, for the metrics.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from common.protocol import FailureReason


class ApiError(Exception):
    status = 500
    error_type = "internal"
    reason = FailureReason.INTERNAL
    prefix = ""
    default = "Internal server error"

    def __init__(self, detail: str | None = None, *, status: int | None = None, reason: str | None = None,
                 param: str | None = None):
        detail = detail or self.default
        self.message = detail if detail.startswith(self.prefix) else self.prefix + detail
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        self.param = param  # the request field at fault (TGI's name), when known
        super().__init__(self.message)

    def to_dict(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(ApiError):
    status, error_type, prefix = 422, "validation", "Input validation error: "
    reason = FailureReason.VALIDATION


class ContextLengthError(ValidationError):
    """The prompt is over `--max-input-tokens` (or over `--max-total-tokens` with the tokens asked)."""

    def __init__(self, detail: str, *, input_length: int, max_new_tokens: int | None, limit: int):
        super().__init__(detail, param="inputs")
        self.input_length, self.max_new_tokens, self.limit = input_length, max_new_tokens, limit


class GenerationError(ApiError):
    status, error_type, prefix = 424, "generation", "Request failed during generation: "
    reason = FailureReason.ENGINE_ERROR


class Overloaded(ApiError):
    status, error_type, default = 429, "overloaded", "Model is overloaded"
    reason = FailureReason.OVERLOADED


class IncompleteGeneration(ApiError):
    status, error_type, default = 500, "incomplete_generation", "Incomplete generation"
    reason = FailureReason.INCOMPLETE


class Unhealthy(ApiError):
    status, error_type, default = 503, "healthcheck", "unhealthy"


_BY_TYPE = {
    cls.error_type: cls for cls in (ValidationError, GenerationError, Overloaded, IncompleteGeneration, Unhealthy)
}

# The statuses the OpenAPI document lists for the generation routes.
GENERATION_ERRORS = {
    401: "Missing or wrong API key (when the service has one: `--api-key`)",
    413: "Request body over 2 MB",
    ValidationError.status: "Input validation error",
    GenerationError.status: "Request failed during generation",
    Overloaded.status: "Model is overloaded",
    IncompleteGeneration.status: "Incomplete generation",
}


def from_event(event) -> ApiError:
    """The exception for an error event (a common.protocol.StreamEvent; unknown types: generation)."""
    return _BY_TYPE.get(event.error_type or "", GenerationError)(event.error, reason=event.reason)


# (body, status) of an error on the routes of one path prefix, given the error and the route.
ErrorWriter = Callable[[ApiError, str], tuple[dict, int]]
_WRITERS = "blitzscale.error_writers"
_ON_ERROR = "blitzscale.on_error"


def error_response(error: ApiError, headers: dict | None = None):
    headers = {**getattr(error, "headers", {}), **(headers or {})}  # e.g. a rate limit's Retry-After
    on_error = current_app.extensions.get(_ON_ERROR)
    if on_error is not None:
        on_error(error)
    for prefix, write in current_app.extensions.get(_WRITERS, {}).items():
        if request.path.startswith(prefix):
            body, status = write(error, request.path)
            return jsonify(body), status, headers or {}
    return jsonify(error.to_dict()), error.status, headers or {}


def _http_error(error: HTTPException):
    """Any werkzeug HTTP error, webargs' 400/422 included, as an ErrorResponse."""
    data = getattr(error, "data", None) or {}
    headers = {k: v for k, v in error.get_headers() if k.lower() in ("allow", "retry-after")}
    if "messages" in data:  # webargs: malformed JSON (400) or wrong JSON types (422)
        exc = getattr(error, "exc", None)
        detail = _body_error(data, exc)
        return error_response(ValidationError(detail, status=error.code, param=_body_param(data, exc)), headers)
    if error.code == 415:
        return error_response(ValidationError("Expected request with `Content-Type: application/json`", status=415))
    if error.code == 413:
        return error_response(ValidationError("the request body is too large", status=413))
    generic = ApiError(error.description or error.name, status=error.code or 500)
    generic.error_type = re.sub(r"\W+", "_", (error.name or "error").lower()).strip("_")
    return error_response(generic, headers)


def _body_error(data: dict, exc: Exception | None) -> str:
    messages = data.get("messages") or {}
    if isinstance(exc, ValueError):  # json.JSONDecodeError, UnicodeDecodeError
        return f"Failed to parse the request body as JSON: {exc}"
    parts = [f"`{path}`: {text}" if path else text for path, text in _flatten(messages.get("json", messages))]
    return "; ".join(parts) or "invalid request body"


def _body_param(data: dict, exc: Exception | None) -> str | None:
    """The first field a schema error names (`messages.0.content`), None for unparsable JSON."""
    if isinstance(exc, ValueError):
        return None
    return next((path for path, _ in _flatten((data.get("messages") or {}).get("json", {})) if path), None)


def _flatten(messages, path: tuple = ()):
    if isinstance(messages, dict):
        for key, value in messages.items():
            yield from _flatten(value, path if key in ("_schema", "json") else path + (str(key),))
    elif isinstance(messages, (list, tuple)):
        for item in messages:
            yield from _flatten(item, path)
    else:
        yield ".".join(path), str(messages)


def register_error_handlers(app: Flask, writers: dict[str, ErrorWriter] | None = None,
                            on_error: Callable[[ApiError], None] | None = None) -> None:
    """`writers`: path prefix -> how the routes under it write their errors (default TGI's);
    `on_error`: called with every error answered (to count it)."""
    app.extensions[_WRITERS] = dict(writers or {})
    app.extensions[_ON_ERROR] = on_error
    app.register_error_handler(ApiError, error_response)
    # Replaces flask-smorest's handler; unhandled exceptions reach it as InternalServerError.
    app.register_error_handler(HTTPException, _http_error)
