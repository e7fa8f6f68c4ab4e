"""Optional API keys, as TGI's `--api-key`: with `api_key` set, the generation routes answer
401 unless the request carries `Authorization: Bearer <api_key>`. A separate `admin_api_key`
protects the operator routes (`require_admin`: /modify_cluster_state and /cluster_state); without
one, those routes take the API key, unless a tenants file makes it a tenant's; with neither key
set, every route is open (TGI's default).
/health, /ping, GET /, /info and /metrics stay open for probes and Prometheus, as in TGI.

Several keys, each a tenant's: `--tenants-file` (common/tenants.py, web/tenancy.py); an API key is
found by its sha256, the admin key compared in constant time (hmac.compare_digest). Keys are never
logged: they live in Settings fields that `repr` leaves out, and no message here names a key or the
header's value.
"""
from __future__ import annotations

import functools
import hmac

from flask import g, request

from common.logs import bind_tenant
from common.protocol import FailureReason
from web.errors import ApiError
from web.service import current_service

SCHEME = "bearer"


class Unauthorized(ApiError):
    status, error_type, default = 401, "unauthorized", "Unauthorized"
    reason = FailureReason.UNAUTHORIZED


def presented_token() -> str | None:
    """The bearer token of the current request, else its `x-api-key` (Anthropic's header), or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != SCHEME or not token.strip():
        return request.headers.get("x-api-key", "").strip() or None
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
    """A `before_request` hook for the generation blueprints: a key of a known tenant (kept on
    `flask.g` for the limits, metrics and logs) when any is configured."""
    tenants = current_service().tenants
    if tenants is None:
        return
    tenant = tenants.identify(presented_token())
    if tenant is None:
        raise Unauthorized("Unauthorized: this route needs a valid API key (`Authorization: Bearer <key>`)")
    g.tenant = tenant
    g.tenant_log_token = bind_tenant(tenant.name)  # its log lines name it (unbound at teardown: web/tenant_metrics.py)
    current_service().limits.admit_request(tenant)  # its requests per minute and concurrency (429)


def require_admin(view):
    """Decorator for the operator views: the admin key, else the API key; with a tenants file,
    no tenant's key opens them, `--api-key` included (it is tenant `default`'s there): closed
    until --admin-api-key is set."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        settings = current_service().settings
        if settings.tenants_file and not settings.admin_api_key:
            raise Unauthorized("Unauthorized: this route needs the admin API key (set --admin-api-key)")
        check(settings.admin_api_key or settings.api_key, "the admin API key")
        return view(*args, **kwargs)

    return wrapper
