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
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import redis

from common.keys import affinity_key
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


def accepts(record: dict | None) -> bool:
    """A live, active replica with a KV slot to spare (running + waiting below its slots)."""
    if not record or record.get("state") != ReplicaState.ACTIVE:
        return False
    slots = record.get("kv_slots") or record.get("max_batch_size") or 1
    return int(record.get("running") or 0) + int(record.get("waiting") or 0) < slots


class PrefixAffinity:
    def __init__(self, connection: redis.Redis, enabled: bool):
        self.redis = connection
        self.enabled = enabled

    def route(self, input_ids: list[int], records: dict[str, dict], salt: str = "") -> Routing:
        """The replica that served the deepest prefix of this prompt and accepts work, if any.
        `salt`: what else its KV depends on (the LoRA adapter), as the replica's cache keys it."""
        if not self.enabled:
            return Routing()
        keys = prefix_keys(input_ids, salt)
        if not keys:
            return Routing()
        served = self.redis.mget([affinity_key(k) for k in keys])
        for name in reversed(served):  # the deepest first: the longest shared prefix
            name = name.decode() if isinstance(name, bytes) else name
            if name and accepts(records.get(name)):
                return Routing(keys, name)
        return Routing(keys)

    def served(self, keys: list[str], replica: str) -> None:
        """`replica` started a job with these prefix keys: route the next ones there."""
        if not keys:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.set(affinity_key(key), replica, ex=AFFINITY_TTL)
            pipe.execute()
        except (redis.RedisError, OSError) as error:  # affinity is a hint: the request goes on
            log.debug("could not record prefix affinity: %s", error)
