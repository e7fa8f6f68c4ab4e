"""How many jobs wait in the broker: the shared `generation` list and the own list of every live
replica, `generation@<replica>` (prefix affinity sends jobs there). What `tgi_queue_size`,
`/cluster_state` and the autoscaler count: a job in a replica's own queue waits as much as one in
the shared queue. A dead replica's queue is left out: the web has sent its jobs to the shared
queue again (they would count twice), and the replicas' sweep deletes it (tasks/queue/hygiene.py)."""
from __future__ import annotations

from collections.abc import Iterable

import redis

from common.keys import GENERATION_QUEUE, replica_queue


def queued_jobs(connection: redis.Redis, replicas: Iterable[str], shared: Iterable[str] = (GENERATION_QUEUE,)) -> int:
    """`replicas`: the names of the live replicas; `shared`: the models' shared queues."""
    pipe = connection.pipeline(transaction=False)
    for queue in [*shared, *(replica_queue(name) for name in replicas)]:
        pipe.llen(queue)
    return sum(int(n) for n in pipe.execute())
