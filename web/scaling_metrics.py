"""Scaling metrics read at scrape time from Redis: how often replicas were scaled up and down
(`blitz_scale_up_times`, by trigger and path), the autoscaler's decisions, and every slot by
state, `dead` and `stopped` included (`blitz_replica_slots`)."""
from __future__ import annotations

import logging

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.states import ReplicaState
from tasks.control.cluster import read_counters, read_slots

log = logging.getLogger(__name__)

NAMES = ("blitz_scale_up_times", "blitz_scale_down_times", "blitz_autoscaler_decisions", "blitz_replica_slots")


class ScalingCollector:
    """`client`: anything with a `redis` attribute (the web's `GenerationClient`)."""

    def __init__(self, client):
        self._redis = getattr(client, "redis", None)

    def collect(self):
        if self._redis is None:
            return
        try:
            counters, slots = read_counters(self._redis), read_slots(self._redis)
        except (redis.RedisError, OSError) as error:  # Redis down: /metrics still answers with the rest
            log.debug("scaling metrics unavailable: %s", error)
            return
        up = CounterMetricFamily("blitz_scale_up_times", "Replicas scaled up (path: standby = add_consumer to a "
                                 "standby replica, process = a new worker process)", labels=["trigger", "path"])
        down = CounterMetricFamily("blitz_scale_down_times", "Replicas scaled down", labels=["trigger", "target"])
        decisions = CounterMetricFamily("blitz_autoscaler_decisions", "Autoscaler decisions that acted",
                                        labels=["action"])
        families = {"scale_up": (up, 2), "scale_down": (down, 2), "decision": (decisions, 1)}
        for name, value in sorted(counters.items()):
            kind, *labels = name.split(":")
            family, arity = families.get(kind, (None, 0))
            if family is not None and len(labels) == arity:
                family.add_metric(labels, value)
        yield from (up, down, decisions)
        by_state = GaugeMetricFamily("blitz_replica_slots", "Replica slots by state", labels=["state"])
        for state in ReplicaState:
            by_state.add_metric([state], sum(1 for v in slots.values() if v["state"] == state))
        yield by_state
