"""Cluster-wide gauges read at scrape time from Redis (the same in one web process or many):
TGI's `tgi_queue_size`, and the replicas by state."""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from common.states import ReplicaState
from web.redis_collector import RedisReader

# The states a live replica record can show (slots, `dead` included, are `blitz_replica_slots`).
STATES = tuple(state for state in ReplicaState if state != ReplicaState.DEAD)
NAMES = ("tgi_queue_size", "blitz_queue_broker", "blitz_replicas", "blitz_replica_state",
         "blitz_replica_running", "blitz_replica_waiting")


class ClusterReader(RedisReader):
    source = "cluster"
    needs_redis = False

    def read(self, client):
        """`client`: a `tasks.client.generation_client.GenerationClient` (its raising readers)."""
        return client.read_replicas(), client.read_queue_size()

    def families(self, values):
        records, broker = values
        waiting = sum(int(r.get("waiting") or 0) for r in records)
        yield _gauge("tgi_queue_size", "Requests waiting: jobs in the broker's queue plus requests waiting "
                     "in the replicas' engines for their prefill", broker + waiting)
        yield _gauge("blitz_queue_broker", "Jobs in the broker's queues, the shared one and the "
                     "replicas' own (not yet taken by a replica)", broker)
        yield _by_state(records)
        yield from _per_replica(records)


def _by_state(records: list[dict]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("blitz_replicas", "Replicas by state", labels=["state"])
    counts = dict.fromkeys(STATES, 0)
    for record in records:
        state = str(record.get("state") or "unknown")
        counts[state] = counts.get(state, 0) + 1
    for state, count in counts.items():
        family.add_metric([state], count)
    return family


def _per_replica(records: list[dict]) -> tuple[GaugeMetricFamily, ...]:
    state = GaugeMetricFamily("blitz_replica_state", "1 for each replica, labelled with its state",
                              labels=["replica", "slot", "state", "device_type"])
    running = GaugeMetricFamily("blitz_replica_running", "Requests in the replica's batch", labels=["replica"])
    waiting = GaugeMetricFamily("blitz_replica_waiting", "Requests waiting in the replica's engine",
                                labels=["replica"])
    for record in records:
        name = str(record.get("name") or "?")
        state.add_metric([name, str(record.get("slot", "")), str(record.get("state") or "unknown"),
                          str(record.get("device_type") or "")], 1)
        running.add_metric([name], int(record.get("running") or 0))
        waiting.add_metric([name], int(record.get("waiting") or 0))
    return state, running, waiting


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family

