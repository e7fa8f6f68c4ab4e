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

from common.keys import WEIGHT_SECRET_KEY
from common.settings import Settings

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


def exposure(settings: Settings) -> str | None:
    """One line when a replica would serve weights to other machines under a secret an API user
    holds (`--weights-secret` equal to the API key, or the admin key equal to it); else None."""
    if not settings.api_key or listens_on_loopback(settings.weights_host):
        return None
    known = settings.weights_secret == settings.api_key or (
        not settings.weights_secret and settings.admin_api_key == settings.api_key)
    if not known:
        return None
    return (f"refusing to start: the weights data plane listens on {settings.weights_host} (--weights-host) "
            "with a secret any API-key holder knows, so they could download the model; set --weights-secret "
            "(or --admin-api-key) to a value distinct from --api-key")
