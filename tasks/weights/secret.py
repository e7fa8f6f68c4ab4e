"""The weight data plane's secret (`X-Blitz-Weights-Key`), never the API key: an API user must not
be able to download the model or its adapters from a replica's data plane.

- `--weights-secret` when set;
- else derived from the admin key (HMAC-SHA256 under a fixed label), so an operator sets one key
  and the data plane still holds a secret no HTTP route accepts;
- else one made at random for this cluster and kept in Redis (`blitz:weights-secret`; Redis has a
  password and is reachable only from inside the cluster, docs/security.md).

`exposure(settings)` is the start-up check: a data plane reachable from other machines whose
secret an API user knows (or can compute) is refused with one line.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket

import redis

from common import tenants
from common.keys import WEIGHT_SECRET_KEY
from common.settings import Settings
from common.tenants import key_digest

DERIVATION_LABEL = b"blitzscale weights data plane v1"


def derived_from_admin_key(admin_key: str) -> str:
    return hmac.new(admin_key.encode("utf-8"), DERIVATION_LABEL, hashlib.sha256).hexdigest()


def configured_secret(settings: Settings) -> str | None:
    """The secret the settings give, or None (then the cluster's random one)."""
    if settings.weights_secret:
        return settings.weights_secret
    if settings.admin_api_key:
        return derived_from_admin_key(settings.admin_api_key)
    return None


def weights_secret(settings: Settings, connection: redis.Redis) -> str:
    configured = configured_secret(settings)
    if configured:
        return configured
    connection.set(WEIGHT_SECRET_KEY, secrets.token_hex(32), nx=True)
    return connection.get(WEIGHT_SECRET_KEY).decode()


def listens_on_loopback(host_setting: str) -> bool:
    """Whether `--weights-host` binds loopback only (`auto` and names resolved as the server will)."""
    host = socket.gethostbyname(socket.gethostname()) if host_setting == "auto" else host_setting
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return False  # unresolvable here: assume reachable
    return address.is_loopback


def api_key_digests(settings: Settings) -> set[str]:
    """The sha256 of every key an API user may hold: `--api-key` and each tenant's key (a file
    that cannot be read adds none: `serve` and `web` refuse it at their start)."""
    held = {key_digest(settings.api_key)} if settings.api_key else set()
    if settings.tenants_file:
        try:
            held |= set(tenants.load(settings.tenants_file).by_digest)
        except tenants.TenantsError:
            pass
    return held


def exposure(settings: Settings) -> str | None:
    """One line when a replica would serve weights to other machines under a secret an API user
    holds (`--weights-secret` equal to the API key or a tenant's, or the admin key equal to one,
    the secret being derived from it); else None."""
    held = api_key_digests(settings)
    if not held or listens_on_loopback(settings.weights_host):
        return None
    source = settings.weights_secret or settings.admin_api_key  # what the secret is, or comes from
    if not source or key_digest(source) not in held:
        return None
    return (f"refusing to start: the weights data plane listens on {settings.weights_host} (--weights-host) "
            "with a secret any API-key holder knows, so they could download the model; set --weights-secret "
            "(or --admin-api-key) to a value distinct from --api-key and every tenant's key")
