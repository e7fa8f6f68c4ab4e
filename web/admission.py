"""TGI's concurrency limit: at most `max_concurrent_requests` generation requests in flight;
the next one gets 429 `Model is overloaded` at once.

The count is held in Redis so that it spans every web process (gunicorn workers, hosts): a
sorted set of leases (`common.keys.admission_key`), member = lease id, score = expiry in Redis
server time. Admitting is one Lua script (drop expired leases, count, add), so two processes
never both take the last slot. Each process renews its live leases every third of
`admission_lease_ttl`; the leases of a process that dies expire and free their slots.
Without Redis (a test double client), the count is kept in this process.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

from common.keys import admission_key
from common.protocol import FailureReason
from web.errors import GenerationError, Overloaded

log = logging.getLogger(__name__)

# KEYS[1] the lease set; ARGV: limit, lease id, lease seconds. Returns 1 when admitted.
_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[2])
return 1
"""
# KEYS[1] the lease set; ARGV: lease seconds, lease ids... (only leases still held are renewed)
_RENEW = """
local now = redis.call('TIME')
local expiry = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return #ARGV - 1
"""


class Admission:
    """The count in this process only."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: set[str] = set()
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests admitted by this process and not yet released."""
        return len(self._held)

    def acquire(self) -> "Slot":
        lease = uuid.uuid4().hex
        if not self._take(lease):
            raise Overloaded()
        return Slot(self, lease)

    def _take(self, lease: str) -> bool:
        with self._lock:
            if len(self._held) >= self.limit:
                return False
            self._held.add(lease)
            return True

    def _give_back(self, lease: str) -> None:
        pass

    def _release(self, lease: str) -> None:
        with self._lock:
            self._held.discard(lease)
        self._give_back(lease)


class RedisAdmission(Admission):
    """The count across every web process, with expiring leases (see the module doc)."""

    def __init__(self, limit: int, connection: redis.Redis, lease_ttl: float):
        super().__init__(limit)
        self._redis = connection
        self._lease_ttl = lease_ttl
        self._acquire = connection.register_script(_ACQUIRE)
        self._renew = connection.register_script(_RENEW)
        self._renewer: threading.Thread | None = None

    def _take(self, lease: str) -> bool:
        self._start_renewer()
        try:
            if not self._acquire(keys=[admission_key()], args=[self.limit, lease, self._lease_ttl]):
                return False
        except (redis.RedisError, OSError) as error:
            raise GenerationError(f"the queue is unavailable: {error}", reason=FailureReason.QUEUE_UNAVAILABLE) from error
        with self._lock:
            self._held.add(lease)
        return True

    def _give_back(self, lease: str) -> None:
        try:
            self._redis.zrem(admission_key(), lease)
        except (redis.RedisError, OSError) as error:  # the lease expires by itself
            log.warning("could not release an admission lease: %s", error)

    def _start_renewer(self) -> None:
        """Started on first use, in the process that serves (after gunicorn forks)."""
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_forever, name="admission-leases", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self._lease_ttl / 3)
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            try:
                self._renew(keys=[admission_key()], args=[self._lease_ttl, *held])
            except (redis.RedisError, OSError) as error:
                log.warning("could not renew %d admission lease(s): %s", len(held), error)


def make_admission(settings, client) -> Admission:
    """Held in Redis when the client has a Redis connection (its reserved pool: a burst of
    requests never delays the renewals), else in this process."""
    connection = getattr(client, "reserved", None)
    if isinstance(connection, redis.Redis):
        return RedisAdmission(settings.max_concurrent_requests, connection, settings.admission_lease_ttl)
    return Admission(settings.max_concurrent_requests)


class Slot:
    """One admitted request. `release` may be called more than once (a stream's generator and
    its response's close hook both call it)."""

    def __init__(self, admission: Admission, lease: str):
        self._admission = admission
        self._lease = lease
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._release(self._lease)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
