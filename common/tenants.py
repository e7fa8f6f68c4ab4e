"""API keys with tenants: `--tenants-file FILE` (YAML), or `--api-key` as the one-tenant shorthand.

    tenants:
      acme: {key_sha256: <hex>, requests_per_minute: 600, tokens_per_minute: 200000,
             max_concurrent_requests: 32}

A key is stored as its sha256 (a plain `key:` is accepted, with a warning: the file then holds a
secret). A presented key is found by its sha256: nothing here compares a secret byte by byte.
Limits left out are unlimited. No Flask, no torch: the web and its tests import this.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"  # the tenant of `--api-key`
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # safe as a metric label and in a Redis key


class TenantsError(ValueError):
    """The tenants file cannot be used (the message names the tenant and the field)."""


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Tenants:
    by_digest: dict[str, Tenant]

    def identify(self, presented: str | None) -> Tenant | None:
        return self.by_digest.get(key_digest(presented)) if presented else None

    def __len__(self) -> int:
        return len(self.by_digest)


def single(api_key: str) -> Tenants:
    """`--api-key` alone: one tenant, no limits of its own."""
    return Tenants({key_digest(api_key): Tenant(DEFAULT_TENANT, key_digest(api_key))})


def load(path: str | Path, api_key: str | None = None) -> Tenants:
    """The file's tenants, with `api_key` (`--api-key` beside the file) as tenant `default`."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as error:
        # any of these must reach the caller as TenantsError: a SIGHUP reload that raised anything
        # else would stop the new gunicorn worker from booting, and gunicorn with it
        raise TenantsError(f"--tenants-file {path}: {type(error).__name__}: {error}") from error
    entries = (document or {}).get("tenants") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise TenantsError(f"--tenants-file {path}: expected `tenants:` mapping names to their key and limits")
    by_digest: dict[str, Tenant] = {}
    for name, entry in entries.items():
        tenant = _tenant(str(name), entry, path)
        if tenant.key_sha256 in by_digest:
            raise TenantsError(f"--tenants-file {path}: tenants {by_digest[tenant.key_sha256].name} and {name} "
                               "have the same key")
        by_digest[tenant.key_sha256] = tenant
    if api_key:
        named = next((t for t in by_digest.values() if t.name == DEFAULT_TENANT), None)
        if named is not None and named.key_sha256 != key_digest(api_key):
            # one name would be two tenants: one prefix-cache namespace, one set of limits and metrics
            raise TenantsError(f"--tenants-file {path}: tenant {DEFAULT_TENANT}: the name of --api-key's tenant, "
                               "with another key; rename it")
        by_digest = {**single(api_key).by_digest, **by_digest}
    return Tenants(by_digest)


def _tenant(name: str, entry, path) -> Tenant:
    where = f"--tenants-file {path}: tenant {name}"
    if not _NAME.match(name):
        raise TenantsError(f"{where}: a name is 1-64 letters, digits, `_`, `.` or `-`")
    if not isinstance(entry, dict):
        raise TenantsError(f"{where}: expected a mapping with `key_sha256`")
    digest = entry.get("key_sha256")
    if digest is None and entry.get("key"):
        log.warning("%s: a plain `key` keeps the secret in the file; store `key_sha256` instead", where)
        digest = key_digest(str(entry["key"]))
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise TenantsError(f"{where}: `key_sha256` must be 64 hex digits (sha256 of the key)")
    limits = {}
    for field in LIMITS:
        value = entry.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise TenantsError(f"{where}: `{field}` must be a positive integer")
        limits[field] = value
    unknown = set(entry) - {"key", "key_sha256", *LIMITS}
    if unknown:
        raise TenantsError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return Tenant(name, digest.lower(), **limits)
