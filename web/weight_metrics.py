"""Weight transfers between replicas, read at scrape time from Redis (the receiving replicas
count them, tasks/weights/sources.py): bytes by source, and how long each transfer took."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from tasks.weights.sources import DURATION_BUCKETS, read_transfers
from web.redis_collector import RedisReader

NAMES = ("blitz_weight_transfer_bytes", "blitz_weight_transfer_duration_seconds")


class WeightTransferReader(RedisReader):
    source = "weight_transfers"

    def read(self, client):
        return read_transfers(client.redis)

    def families(self, values):
        sent = CounterMetricFamily("blitz_weight_transfer_bytes", "Weight bytes replicas received from each "
                                   "peer (source: the replica that sent them)", labels=["source"])
        for key, value in sorted(values.items()):
            if key.startswith("bytes:"):
                sent.add_metric([key.removeprefix("bytes:")], int(value))
        yield sent
        buckets, cumulative = [], 0
        for bound in (*DURATION_BUCKETS, "+Inf"):
            cumulative += int(values.get(f"duration:le:{bound}", 0))
            buckets.append((str(float(bound)) if bound != "+Inf" else "+Inf", cumulative))
        yield HistogramMetricFamily("blitz_weight_transfer_duration_seconds", "Duration of a replica's weight "
                                    "copy from peers (the ones that completed)", buckets=buckets,
                                    sum_value=float(values.get("duration:sum", 0)))
