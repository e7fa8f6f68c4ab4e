"""Prefix affinity: send a job to the replica whose prefix cache most likely holds its prompt.

A replica's prefix cache (docs/engine.md) helps only if the next request with that prefix, the
next turn of a conversation or the next question under one system prompt, reaches the same
replica. So the web keys a prompt by chained hashes of its first blocks of KEY_BLOCK tokens
(blake2b: the same in every web process), and when a replica starts a job (its `started` event)
records in Redis that this replica served those keys (`common.keys.affinity_key`, for
AFFINITY_TTL seconds). A new job whose deepest served key belongs to a live, active, not
overloaded replica goes to that replica's own Celery queue (`common.keys.replica_queue`), which
only it consumes; every other job goes to the shared queue. A job in a replica's own queue is
never stranded: when that replica has not taken it within `--affinity-wait` seconds, or stops
serving, the web sends it to the shared queue as a newer attempt (tasks/client/event_stream.py).

A replica's record is up to a heartbeat and a record read old, so a burst sharing one system
prompt would all look to fit on the replica that served it. Every web process therefore also
counts, in Redis, the jobs routed to each replica that its record cannot show yet
(`common.keys.routed_key`: routed and not started, or started within a record's age), adds them
to its load, and bounds them (`own_queue_bound`): past that, jobs go to the shared queue, where
every replica takes work.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import redis

from common.keys import affinity_key, routed_key
from common.states import ReplicaState

log = logging.getLogger(__name__)

KEY_BLOCK = 64  # tokens per key: a prompt shorter than that is not routed
MAX_KEYS = 32  # the first 2,048 tokens decide
AFFINITY_TTL = 600  # seconds a replica is remembered as having served a prefix


@dataclass
class Routing:
    """Where a job was sent: a replica's own queue, or the shared one (`replica` None)."""

    keys: list[str] = field(default_factory=list)  # its prompt's prefix keys, shortest first
    replica: str | None = None
    sent_at: float = field(default_factory=time.monotonic)
    request_id: str | None = None  # as counted in the replica's routed set


def prefix_keys(input_ids: list[int], salt: str = "") -> list[str]:
    """One key per full block of the prompt's first MAX_KEYS blocks, each naming everything
    before it (a chain), so two prompts share key k exactly when they share k blocks."""
    digest = hashlib.blake2b(salt.encode(), digest_size=16)
    keys = []
    for start in range(0, min(len(input_ids), KEY_BLOCK * MAX_KEYS) - KEY_BLOCK + 1, KEY_BLOCK):
        digest.update(b"".join(t.to_bytes(4, "little") for t in input_ids[start : start + KEY_BLOCK]))
        keys.append(digest.copy().hexdigest())
    return keys


def job_salt(cache_salt: str, adapter_id: str | None) -> str:
    """What a job's KV depends on besides its tokens, as the replica's cache keys it: its cache
    namespace (tenant and `cache_salt`, web/tenancy.py) and its LoRA adapter."""
    return f"{cache_salt}\0{adapter_id or ''}" if cache_salt else (adapter_id or "")


def accepts(record: dict | None, routed: int = 0) -> bool:
    """A live, active replica with a KV slot to spare (running + waiting + `routed` there that
    its record does not show yet, below its slots), its routed jobs within `own_queue_bound`."""
    if not record or record.get("state") != ReplicaState.ACTIVE:
        return False
    slots = int(record.get("kv_slots") or record.get("max_batch_size") or 1)
    busy = int(record.get("running") or 0) + int(record.get("waiting") or 0) + routed
    return busy < slots and routed < own_queue_bound(slots)


def own_queue_bound(slots: int) -> int:
    """How many jobs affinity may send one replica ahead of its record: half its KV slots, so a
    burst sharing a prefix fills about half a replica, and the rest spread through the shared queue."""
    return max(1, slots // 2)


class PrefixAffinity:
    def __init__(self, connection: redis.Redis, enabled: bool, affinity_wait: float = 2.0, record_age: float = 2.0):
        """`record_age`: how old a replica's record may be when read (heartbeat + record reads);
        `affinity_wait`: how long a routed job may wait in the replica's queue before a reroute."""
        self.redis = connection
        self.enabled = enabled
        self.started_for = record_age  # a started job counts until the replica's record shows it
        self.routed_for = affinity_wait + record_age  # a routed one until its reroute, and then that

    def route(self, input_ids: list[int], records: dict[str, dict], salt: str = "",
              request_id: str | None = None) -> Routing:
        """The replica that served the deepest prefix of this prompt and accepts work, if any.
        `salt`: what else its KV depends on (the LoRA adapter), as the replica's cache keys it."""
        if not self.enabled:
            return Routing()
        keys = prefix_keys(input_ids, salt)
        if not keys:
            return Routing()
        served = self.redis.mget([affinity_key(k) for k in keys])
        names = []  # the deepest first: the longest shared prefix
        for name in reversed(served):
            name = name.decode() if isinstance(name, bytes) else name
            if name and name not in names and accepts(records.get(name)):
                names.append(name)
        if not names:
            return Routing(keys)
        routed = self._routed(names)
        for name in names:
            if accepts(records.get(name), routed[name]):
                request_id = request_id or uuid.uuid4().hex
                self._count(name, request_id, self.routed_for)
                return Routing(keys, name, request_id=request_id)
        return Routing(keys)

    def served(self, routing: Routing, replica: str) -> None:
        """`replica` started the job: route the next ones with its prefix keys there; a job it
        took from its own queue counts until its record shows it."""
        if not routing.keys:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in routing.keys:
                pipe.set(affinity_key(key), replica, ex=AFFINITY_TTL)
            if routing.replica == replica and routing.request_id:
                pipe.zadd(routed_key(replica), {routing.request_id: time.time() + self.started_for}, xx=True)
            pipe.execute()
        except (redis.RedisError, OSError) as error:  # affinity is a hint: the request goes on
            log.debug("could not record prefix affinity: %s", error)

    def _routed(self, names: list[str]) -> dict[str, int]:
        """Jobs routed to each replica that its record does not show yet (expired ones dropped)."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zremrangebyscore(routed_key(name), "-inf", now)
            pipe.zcard(routed_key(name))
        counts = pipe.execute()[1::2]
        return dict(zip(names, (int(c) for c in counts)))

    def _count(self, name: str, request_id: str, seconds: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(routed_key(name), {request_id: time.time() + seconds})
        pipe.expire(routed_key(name), math.ceil(seconds) + 1)
        pipe.execute()
