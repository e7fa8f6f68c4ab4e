"""Optional API keys, as TGI's `--api-key`: with `api_key` set, the generation routes answer
401 unless the request carries `Authorization: Bearer <api_key>`. A separate `admin_api_key`
protects the cluster's control routes (`require_admin`, e.g. /modify_cluster_state); without one,
those routes take the API key; with neither key set, every route is open (TGI's default).

Keys are compared in constant time (hmac.compare_digest) and never logged: they live in
Settings fields that `repr` leaves out, and no message here names a key or the header's value.
"""
from __future__ import annotations

import functools
import hmac

from flask import request

from common.protocol import FailureReason
from web.errors import ApiError
from web.service import current_service

SCHEME = "bearer"


class Unauthorized(ApiError):
    status, error_type, default = 401, "unauthorized", "Unauthorized"
    reason = FailureReason.UNAUTHORIZED


def presented_token() -> str | None:
    """The bearer token of the current request, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != SCHEME or not token.strip():
        return None
    return token.strip()


def key_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (for keys of the same length; the length may leak, not the key)."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def check(expected: str | None, what: str = "a valid API key") -> None:
    """Raise Unauthorized unless no key is configured or the request presents it."""
    if expected and not key_matches(presented_token(), expected):
        raise Unauthorized(f"Unauthorized: this route needs {what} (`Authorization: Bearer <key>`)")


def require_api_key() -> None:
    """A `before_request` hook for the generation blueprint."""
    check(current_service().settings.api_key)


def require_admin(view):
    """Decorator for the cluster's control views: the admin key, else the API key, if any."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        settings = current_service().settings
        check(settings.admin_api_key or settings.api_key, "the admin API key")
        return view(*args, **kwargs)

    return wrapper
