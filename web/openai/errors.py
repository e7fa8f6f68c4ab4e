"""OpenAI's error object on every `/v1` route: `{"error": {"message", "type", "param", "code"}}`
with OpenAI's statuses, so that the `openai` SDK raises its own exception classes (BadRequestError,
AuthenticationError, NotFoundError, RateLimitError, InternalServerError) and the frameworks
built on it recognize a context overflow (`code: "context_length_exceeded"`).

The errors themselves stay TGI's classes (`web.errors`), so the `tgi_request_*` metrics count them
as on TGI's routes; only what is written changes. Inside a stream the same object is one
`data: {"error": ...}` chunk.
"""
from __future__ import annotations

from common.protocol import FailureReason
from web.errors import ApiError, ContextLengthError, ValidationError

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# TGI's status -> OpenAI's (status, type); any other status: invalid_request_error with its status.
_BY_STATUS = {
    400: (400, INVALID_REQUEST),
    401: (401, "authentication_error"),
    404: (404, "not_found_error"),
    422: (400, INVALID_REQUEST),
    424: (500, SERVER_ERROR),
    429: (429, "rate_limit_error"),
    500: (500, SERVER_ERROR),
    503: (503, SERVER_ERROR),
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
# The service cannot serve at all right now (a client may retry later): 503, not 500.
_UNAVAILABLE = {FailureReason.QUEUE_UNAVAILABLE, FailureReason.NO_REPLICA, FailureReason.TOKENIZER_UNAVAILABLE,
                FailureReason.QUEUE_TIMEOUT}
# TGI's parameter names, as the OpenAI request calls them (chat, completions).
_PARAMS = {
    "max_new_tokens": ("max_tokens", "max_tokens"),
    "top_n_tokens": ("top_logprobs", "logprobs"),
    "inputs": ("messages", "prompt"),
    "grammar": ("response_format", "response_format"),
}
OPENAI_PREFIX = "/v1/"
CHAT_ROUTE = "/v1/chat/completions"
RESPONSES_ROUTE = "/v1/responses"  # a chat body underneath: TGI's and chat's names, as the request calls them
_RESPONSES_PARAMS = {"inputs": "input", "messages": "input", "max_new_tokens": "max_output_tokens",
                     "max_tokens": "max_output_tokens", "grammar": "text", "response_format": "text"}


class OpenAIError(ValidationError):
    """A 400 worded by OpenAI (no TGI prefix), with OpenAI's `code`."""

    prefix = ""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 422):
        super().__init__(message, param=param, status=status)
        self.code = code


class ModelNotFound(OpenAIError):
    def __init__(self, model: str, served: list[str] | None = None):
        known = f" The models served here: {', '.join(served)}." if served else ""
        super().__init__(f"The model `{model}` does not exist.{known}", param="model", code="model_not_found",
                         status=404)


def context_length_exceeded(error: ContextLengthError, requested: int | None, route: str) -> OpenAIError:
    """OpenAI's words for an over-long prompt, which frameworks match (with the code) to trim and
    retry. The last sentence is ours: the `openai` SDK (3.x) keeps only the message in `str(e)`,
    where langchain-openai looks for the code or "prompt is too long"."""
    completion = requested or 0
    return OpenAIError(
        f"This model's maximum context length is {error.limit} tokens. However, you requested "
        f"{error.input_length + completion} tokens ({error.input_length} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion. The prompt is too long.",
        param=_param("inputs", route), code="context_length_exceeded")


def error_body(error: ApiError, route: str) -> dict:
    """The inner error object (what a stream's error chunk holds)."""
    return {"message": error.message, "type": _status_and_type(error)[1], "param": _param(error.param, route),
            "code": getattr(error, "code", None) or _CODES.get(error.status)}


def write_error(error: ApiError, route: str) -> tuple[dict, int]:
    """(body, status) of an error answered before a response began."""
    return {"error": error_body(error, route)}, _status_and_type(error)[0]


def client_status(error: ApiError, route: str) -> int:
    """The status the client is answered with on `route` (OpenAI's on `/v1/`, else TGI's)."""
    return _status_and_type(error)[0] if route.startswith(OPENAI_PREFIX) else error.status


def _status_and_type(error: ApiError) -> tuple[int, str]:
    if error.reason in _UNAVAILABLE:
        return 503, SERVER_ERROR
    return _BY_STATUS.get(error.status, (error.status, INVALID_REQUEST if error.status < 500 else SERVER_ERROR))


def _param(param: str | None, route: str) -> str | None:
    if param is None:
        return None
    if route.startswith(RESPONSES_ROUTE):
        return _RESPONSES_PARAMS.get(param, param)
    names = _PARAMS.get(param)
    return param if names is None else names[0 if route == CHAT_ROUTE else 1]
