"""Who is asking: the tenant of the request's API key (common/tenants.py), kept on `flask.g` for
the limits, the metrics and the logs; and the prefix cache's namespace that follows from it.

The tenants are read when the app is made: `--tenants-file`, else `--api-key` as one tenant, else
none (every route open). gunicorn makes the app again in new workers when its master gets SIGHUP,
so `kill -HUP <web pid>` reloads the file without dropping the listening socket.
"""
from __future__ import annotations

import logging

from flask import g, has_app_context

from common.settings import Settings
from common.tenants import Tenant, Tenants, TenantsError, load, single

log = logging.getLogger(__name__)


def load_tenants(settings: Settings) -> Tenants | None:
    """`--tenants-file` (with `--api-key` as tenant `default` too, when both are set), else
    `--api-key` alone, else None. A file that became unreadable after the start (a SIGHUP reload)
    refuses every key rather than stopping the web: the start itself checked it (blitzscale/cli.py)."""
    if settings.tenants_file:
        try:
            return load(settings.tenants_file, api_key=settings.api_key)
        except TenantsError as error:
            log.error("%s: every API key is refused until the file is fixed and reloaded (SIGHUP)", error)
            return Tenants({})
    return single(settings.api_key) if settings.api_key else None


def current_tenant() -> Tenant | None:
    """The request's tenant (None: no keys configured, or outside a request)."""
    return g.get("tenant") if has_app_context() else None


def isolation(settings: Settings, tenants: Tenants | None) -> str:
    return settings.prefix_cache_isolation or ("tenant" if tenants else "shared")


def cache_namespace(mode: str, tenant: Tenant | None, salt: str) -> str:
    """What the replica's prefix cache and the affinity keys are salted with: a prefix is shared
    only within one namespace, so `cached_tokens` never tells one tenant what another sent."""
    owner = tenant.name if mode == "tenant" and tenant is not None else ""
    return f"tenant:{owner}\0salt:{salt}" if owner or salt else ""
