"""What the web needs to know about the replicas: health, and their model and device facts
(for /info and `x-compute-type`), read from the replica records in Redis."""
from __future__ import annotations

import time

import redis

from common.states import ReplicaState
from tasks.control.cluster import read_agents


class ClusterView:
    def __init__(self, client, compute_type_ttl: float = 5.0, settings=None, model: str | None = None):
        """`model`: only its replicas (several models); `settings`: a cluster whose models start
        replicas on demand is healthy while every model is servable (docs/models.md)."""
        self._client = client
        self._settings = settings
        self._model = model
        self._ttl = compute_type_ttl
        self._compute_type: tuple[float, str] | None = None

    def active_replicas(self) -> list[dict]:
        replicas = [r for r in self._client.replicas() if r.get("state") == ReplicaState.ACTIVE
                    and (self._model is None or r.get("model") == self._model)]
        return sorted(replicas, key=lambda r: (r.get("slot") is None, r.get("slot") or 0))

    def healthy(self) -> bool:
        """Redis answers and at least one replica serves; where models start replicas on demand,
        every model is servable: it has an active replica, or a host agent can start one."""
        if not self._client.redis_alive():
            return False
        if self._settings is None or not self._settings.cold_starts:
            return bool(self.active_replicas())
        active = {r.get("model") for r in self.active_replicas()}
        if all(name in active for name in self._settings.catalog.names):
            return True
        try:
            return bool(read_agents(self._client.redis))
        except (redis.RedisError, OSError):
            return False

    def first_active(self) -> dict | None:
        active = self.active_replicas()
        return active[0] if active else None

    def compute_type(self) -> str:
        """The serving device type (`x-compute-type`), re-read at most every few seconds."""
        now = time.monotonic()
        if self._compute_type is None or now - self._compute_type[0] > self._ttl:
            replica = self.first_active() or {}
            self._compute_type = (now, str(replica.get("device_type") or "cpu"))
        return self._compute_type[1]
