"""Scaling metrics read at scrape time from Redis: how often replicas were scaled up and down
(`blitz_scale_up_times`, by trigger and path), the autoscaler's decisions, and every slot by
state, `dead` and `stopped` included (`blitz_replica_slots`)."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.states import ReplicaState
from tasks.control.cluster import read_counters, read_slots
from web.redis_collector import RedisCollector

NAMES = ("blitz_scale_up_times", "blitz_scale_down_times", "blitz_autoscaler_decisions", "blitz_replica_slots")


class ScalingCollector(RedisCollector):
    def read(self, connection):
        return read_counters(connection), read_slots(connection)

    def families(self, values):
        counters, slots = values
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
