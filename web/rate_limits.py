"""Per-tenant limits (common/tenants.py), counted in Redis so that every web process (gunicorn
workers, hosts) shares them:

- requests per minute and tokens per minute: a sliding window of 60 s, one sorted set per tenant
  and limit (member = `<id>:<cost>`, score = when, in Redis server time). A request's tokens are
  charged when it is validated: its prompt plus the tokens it may generate (`max_new_tokens` ×
  candidates), as OpenAI counts `max_tokens` against a tokens-per-minute limit;
- concurrent requests: leases that expire after the longest a request can last (released when
  the response closes, streams included).

Each check is one Lua script (drop what left the window, sum, add), so two processes never both
take the last unit. Over a limit: 429 with `Retry-After` (seconds until enough leaves the window)
and OpenAI's `x-ratelimit-*` headers; a request within its limits gets the headers too.
"""
from __future__ import annotations

import logging
import math
import uuid

import redis
from flask import after_this_request, g

from common.keys import tenant_limit_key
from common.protocol import FailureReason
from common.tenants import Tenant
from web.errors import ApiError, GenerationError

log = logging.getLogger(__name__)

WINDOW_S = 60.0

# KEYS[1] the window; ARGV: window seconds, limit, cost, member. Returns {admitted, used, wait seconds}.
_WINDOW = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local window, limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - window)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
if used + cost > limit then
  -- until enough of the oldest entries leave the window
  local freed, wait = 0, window
  for i = 1, #entries, 2 do
    freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
    if used - freed + cost <= limit then wait = tonumber(entries[i + 1]) + window - t break end
  end
  return {0, used, tostring(wait)}
end
redis.call('ZADD', KEYS[1], t, ARGV[4] .. ':' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return {1, used + cost, tostring(window)}
"""
# KEYS[1] the leases; ARGV: limit, lease id, lease seconds. Returns {admitted, held}.
_LEASE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return {0, held} end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return {1, held + 1}
"""


class RateLimited(ApiError):
    """TGI's shape on TGI routes; OpenAI's `rate_limit_exceeded` on /v1 (web/openai/errors.py)."""

    status, error_type, default = 429, "rate_limit", "Rate limit reached"
    reason = FailureReason.OVERLOADED

    def __init__(self, detail: str, headers: dict[str, str]):
        super().__init__(detail)
        self.headers = headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `0.5s`."""
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def redis_connection(client) -> redis.Redis | None:
    """The web's Redis (None with a test double client: no limits can be shared)."""
    connection = getattr(client, "redis", None)
    return connection if isinstance(connection, redis.Redis) else None


class TenantLimits:
    def __init__(self, connection: redis.Redis | None, lease_s: float):
        self.redis = connection
        self.lease_s = lease_s
        if connection is not None:
            self._window = connection.register_script(_WINDOW)
            self._lease = connection.register_script(_LEASE)

    def _headers(self) -> dict[str, str]:
        return g.setdefault("ratelimit_headers", {})

    def admit_request(self, tenant: Tenant | None) -> None:
        """Before the body is read: the requests-per-minute window, then a concurrency lease
        (released when the response closes)."""
        if tenant is None or self.redis is None:
            return
        self._send_headers_with_response()
        if tenant.requests_per_minute:
            self._charge(tenant, "rpm", "requests", tenant.requests_per_minute, 1)
        if tenant.max_concurrent_requests:
            lease = uuid.uuid4().hex
            key = tenant_limit_key(tenant.name, "concurrent")
            admitted, _held = self._call(self._lease, key, [tenant.max_concurrent_requests, lease, self.lease_s])
            if not admitted:
                log.warning("tenant %s over its limit of %d concurrent requests", tenant.name,
                            tenant.max_concurrent_requests)
                raise RateLimited(f"Rate limit reached for tenant {tenant.name}: "
                                  f"{tenant.max_concurrent_requests} concurrent requests", {"Retry-After": "1"})

            @after_this_request
            def release_on_close(response):
                response.call_on_close(lambda: self._release(key, lease))
                return response

    def charge_tokens(self, tenant: Tenant | None, tokens: int) -> None:
        """After validation: the prompt and the most it may generate, against tokens per minute."""
        if tenant is None or self.redis is None or not tenant.tokens_per_minute:
            return
        self._charge(tenant, "tpm", "tokens", tenant.tokens_per_minute, max(1, tokens))

    def _charge(self, tenant: Tenant, what: str, unit: str, limit: int, cost: int) -> None:
        admitted, used, wait = self._call(self._window, tenant_limit_key(tenant.name, what),
                                          [WINDOW_S, limit, cost, uuid.uuid4().hex])
        wait = float(wait)
        headers = self._headers()
        headers.update({f"x-ratelimit-limit-{unit}": str(limit),
                        f"x-ratelimit-remaining-{unit}": str(max(0, limit - int(used))),
                        f"x-ratelimit-reset-{unit}": _duration(wait)})
        if not admitted:
            retry = max(1, math.ceil(wait))
            log.warning("tenant %s over its limit of %d %s per minute (retry in %d s)", tenant.name, limit, unit, retry)
            raise RateLimited(f"Rate limit reached for tenant {tenant.name}: {limit} {unit} per minute "
                              f"(used {used}, asked {cost}); retry in {retry} s",
                              {**headers, "Retry-After": str(retry)})

    def _call(self, script, key: str, args: list):
        try:
            return script(keys=[key], args=args)
        except (redis.RedisError, OSError) as error:
            raise GenerationError(f"the queue is unavailable: {error}", reason=FailureReason.QUEUE_UNAVAILABLE) from error

    def _release(self, key: str, lease: str) -> None:
        try:
            self.redis.zrem(key, lease)
        except (redis.RedisError, OSError):  # the lease expires by itself
            pass

    def _send_headers_with_response(self) -> None:
        @after_this_request
        def add_headers(response):
            for name, value in g.get("ratelimit_headers", {}).items():
                response.headers.setdefault(name, value)
            return response
