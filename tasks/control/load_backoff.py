"""Replicas that cannot load (their model or an adapter is misconfigured): the autoscaler backs
off instead of restarting them in a loop.

A replica that fails to load marks its slot `dead` with `cannot_load` and the reason
(tasks/runtime/lifecycle.py). Each new such failure doubles the wait before the autoscaler starts
a process again (`base_s`, 2×, 4×, ... up to `cap_s`); a failed slot seen active again ends it.
What it holds is shown in the autoscaler's state (`/cluster_state`, `autoscaler.backoff`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import redis

from common.slot_leases import load_failure
from common.states import ReplicaState
from tasks.control.cluster import read_slots


def backoff_delay(failures: int, base_s: float, cap_s: float) -> float:
    """The wait after the `failures`-th failure in a row (1: `base_s`)."""
    return min(cap_s, base_s * 2 ** max(0, failures - 1))


@dataclass
class LoadBackoff:
    base_s: float = 5.0
    cap_s: float = 300.0
    failures: int = 0
    retry_at: float = 0.0
    reason: str | None = None
    # slot -> `updated_at` of the last failure counted there: one entry per slot, so it stays as
    # small as the cluster however long the autoscaler runs
    _counted: dict[int, float] = field(default_factory=dict)
    _failed_slots: set[int] = field(default_factory=set)

    def observe(self, slots: dict[int, dict], now: float) -> None:
        """Count the failures not seen yet; a failed slot now active (it loaded after all) resets."""
        if any(slots.get(s, {}).get("state") == ReplicaState.ACTIVE for s in self._failed_slots):
            self.failures, self.retry_at, self.reason = 0, 0.0, None
            self._failed_slots.clear()
        for slot, view in sorted(slots.items()):
            updated_at = view.get("updated_at", 0.0)
            if not view.get("cannot_load") or self._counted.get(slot) == updated_at:
                continue
            self._counted[slot] = updated_at
            self._failed_slots.add(slot)
            self.failures += 1
            self.reason = view.get("error") or "the replica could not load"
            self.retry_at = now + backoff_delay(self.failures, self.base_s, self.cap_s)

    def holds(self, now: float) -> bool:
        """No new process may start now."""
        return now < self.retry_at

    def view(self, now: float) -> dict | None:
        if not self.failures:
            return None
        return {"failures": self.failures, "reason": self.reason, "retry_in_s": round(max(0.0, self.retry_at - now), 1)}


def replica_cannot_load(settings, since: float):
    """For `serve`: a check that names a replica of this run that could not load (a configuration
    error: restarting it would fail the same way), else None; Redis away counts as nothing. With
    several models that failure is one model's (maybe at a cold start hours in): its requests fail
    naming why (docs/models.md) and the other models keep serving, so it never stops the service."""
    if settings.catalog.several:
        return lambda: None
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)

    def check() -> str | None:
        try:
            return load_failure(read_slots(connection), since)
        except redis.RedisError:
            return None
    return check
