"""The states of a replica slot, named once (docs/scaling.md):

    loading ──► active ──► draining ──► standby ──► (active again | stopped)
    dead: the slot's heartbeat expired without a clean stop

They travel as plain strings (replica records, slot registry, metrics labels): a `ReplicaState`
is a `str`, equal to its value, and formats as it.
"""
from __future__ import annotations

from enum import Enum


class ReplicaState(str, Enum):
    LOADING = "loading"  # the process loads its model
    ACTIVE = "active"  # consuming the generation queue
    DRAINING = "draining"  # not consuming, still running requests
    STANDBY = "standby"  # not consuming, nothing in flight, weights in memory
    STOPPED = "stopped"  # exited cleanly
    DEAD = "dead"  # vanished without a clean exit (its heartbeat expired)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


LIVE_STATES = (ReplicaState.LOADING, ReplicaState.ACTIVE, ReplicaState.DRAINING, ReplicaState.STANDBY)
"""A process holds the slot."""

SERVING_STATES = (ReplicaState.ACTIVE, ReplicaState.LOADING)
"""Replicas that take jobs now or soon: a job enqueued with none of them would wait for nothing."""
