"""What the web needs to know about the replicas: health, and their model and device facts
(for /info and `x-compute-type`), read from the replica records in Redis."""
from __future__ import annotations

import time

from common.states import ReplicaState


class ClusterView:
    def __init__(self, client, compute_type_ttl: float = 5.0):
        self._client = client
        self._ttl = compute_type_ttl
        self._compute_type: tuple[float, str] | None = None

    def active_replicas(self) -> list[dict]:
        replicas = [r for r in self._client.replicas() if r.get("state") == ReplicaState.ACTIVE]
        return sorted(replicas, key=lambda r: (r.get("slot") is None, r.get("slot") or 0))

    def healthy(self) -> bool:
        """Redis answers and at least one replica serves."""
        return bool(self._client.redis_alive() and self.active_replicas())

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
