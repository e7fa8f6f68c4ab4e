"""How many jobs wait in the broker: the shared `generation` list and every replica's own
`generation@<replica>` list (prefix affinity sends jobs there). What `tgi_queue_size`,
`/cluster_state` and the autoscaler count: a job in a replica's own queue waits as much as one in
the shared queue."""
from __future__ import annotations

import redis

from common.keys import GENERATION_QUEUE

OWN_QUEUES = f"{GENERATION_QUEUE}@*"


def queued_jobs(connection: redis.Redis) -> int:
    queues = [GENERATION_QUEUE] + list(connection.scan_iter(match=OWN_QUEUES, count=100))
    pipe = connection.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    return sum(int(n) for n in pipe.execute())
