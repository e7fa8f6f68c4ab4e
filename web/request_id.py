"""A request id on every request: the client's `x-request-id` when it sends a usable one, else a
new one; echoed on the response and bound for logging (see common.logs), and carried to the
replica on the job (`Job.trace_id`), so the web's and the replica's log lines name it alike."""
from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g

from common.logs import bind_request_id, unbind_request_id

HEADER = "x-request-id"
MAX_LENGTH = 128
_USABLE = re.compile(r"^[A-Za-z0-9._:/+=@-]+$")  # printable, no spaces: safe in a log line


def request_id() -> str | None:
    """The current request's id (None outside a request)."""
    return g.get("request_id")


def from_client(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value or len(value) > MAX_LENGTH or not _USABLE.match(value):
        return None
    return value


def init_app(app: Flask) -> None:
    @app.before_request
    def _bind():
        from flask import request

        g.request_id = from_client(request.headers.get(HEADER)) or uuid.uuid4().hex
        g.request_id_token = bind_request_id(g.request_id)

    @app.after_request
    def _echo(response: Response) -> Response:
        if g.get("request_id"):
            response.headers[HEADER] = g.request_id
        return response

    @app.teardown_request
    def _unbind(_error=None):
        token = g.pop("request_id_token", None)
        if token is not None:
            unbind_request_id(token)
