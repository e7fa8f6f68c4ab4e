"""When each served model was last used: a request the web took for it, or one of its replicas
turning active (a fresh replica counts as used, so neither scale to zero nor an eviction takes it
before its first request). The idle clock of scale to zero and of LRU eviction (docs/models.md);
here, below the web, the replicas and the control plane, because all three keep it."""
from __future__ import annotations

import time

import redis

from common.keys import MODEL_USED_KEY


def touch(connection: redis.Redis, model: str, now: float | None = None) -> None:
    """`model` was used now (its idle time starts again)."""
    connection.hset(MODEL_USED_KEY, model, now or time.time())


def last_used(connection: redis.Redis) -> dict[str, float]:
    """Model name -> when it was last used (epoch seconds); a model never used is absent."""
    return {k.decode(): float(v) for k, v in connection.hgetall(MODEL_USED_KEY).items()}
