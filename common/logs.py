"""Logging for every process: text or JSON lines (`--log-format` / LOG_FORMAT), each line with
the request id it belongs to (`x-request-id`, bound by the web per request and by a replica per
task), so one request can be followed from the web's log to the replica's.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import os
import socket
import time

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s%(tenant_suffix)s]: %(message)s"
NO_REQUEST = "-"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("blitzscale_request_id", default=None)
# The tenant of the request's API key (web/auth.py), named in its lines beside the request id.
_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("blitzscale_tenant", default=None)


def bind_tenant(name: str | None) -> contextvars.Token:
    return _tenant.set(name)


def unbind_tenant(token: contextvars.Token) -> None:
    try:
        _tenant.reset(token)
    except ValueError:
        _tenant.set(None)


def current_request_id() -> str | None:
    return _request_id.get()


def bind_request_id(request_id: str | None) -> contextvars.Token:
    """Bind for the rest of this thread's context; undo with `unbind_request_id(token)`."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # reset from another context (a generator closed elsewhere): clear it
        _request_id.set(None)


@contextlib.contextmanager
def request_id_bound(request_id: str | None):
    token = bind_request_id(request_id)
    try:
        yield
    finally:
        unbind_request_id(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute (the bound one, or `-`), and its tenant's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or _access_log_id(record) or NO_REQUEST
        if not hasattr(record, "tenant"):
            record.tenant = _tenant.get()
        record.tenant_suffix = f" tenant={record.tenant}" if record.tenant else ""
        return True


def _access_log_id(record: logging.LogRecord) -> str | None:
    """gunicorn's access line is written after the request: its id is the response header."""
    if record.name == "gunicorn.access" and isinstance(record.args, dict):
        value = record.args.get("{x-request-id}o")
        return value if value and value != "-" else None
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, tenant, process, host (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
            "tenant": getattr(record, "tenant", None) or _tenant.get(),
            "process": record.process,
            "host": _HOST,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_HOST = socket.gethostname()


def check_format(log_format: str) -> str:
    fmt = (log_format or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {log_format!r}")
    return fmt


def logging_config(level: str = "INFO", log_format: str = "text", *, gunicorn: bool = False) -> dict:
    """A `logging.config.dictConfig` dict: one stderr handler with the request-id filter.
    With `gunicorn`, its error and access loggers write through the same handler."""
    fmt = check_format(log_format)
    formatter = {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"blitzscale": formatter},
        "handlers": {"stderr": {
            "class": "logging.StreamHandler", "stream": "ext://sys.stderr",
            "formatter": "blitzscale", "filters": ["request_id"],
        }},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {},
    }
    if gunicorn:
        for name in ("gunicorn.error", "gunicorn.access"):
            config["loggers"][name] = {"level": "INFO", "handlers": ["stderr"], "propagate": False}
    return config


def configure(level: str | None = None, log_format: str | None = None) -> None:
    """Configure this process's logging (LOG_LEVEL and LOG_FORMAT when not given)."""
    level = level or os.environ.get("LOG_LEVEL") or "INFO"
    log_format = log_format or os.environ.get("LOG_FORMAT") or "text"
    logging.config.dictConfig(logging_config(level, log_format))
