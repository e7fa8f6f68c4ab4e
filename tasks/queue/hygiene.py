"""Queue hygiene: no job, and so no prompt, stays in Redis long after its request ended.

A job is in Redis in three kinds of places (kombu's Redis transport): a queue list (the shared
`generation`, or a replica's own `generation@<replica>`), and, once a replica fetched it, the
`unacked` hash (with its `unacked_index`) until the replica acknowledges it. What the web and
the replicas do so that none is left behind (docs/failure-policy.md, "Queue hygiene"):

- every send gives its queue list a TTL of the request timeout, renewed by the next send: a
  list nobody consumes (no replica left, or a replica that died) is gone once every request that
  could wait for its jobs has ended (tasks/client/generation_client.py);
- `sweep` (one replica of the cluster runs it every SWEEP_INTERVAL_S: each replica tries every
  interval, and the one that takes the turn (`take_sweep_turn`) sweeps, so the keyspace is
  scanned once per interval however many replicas there are) deletes the own queue of a replica whose
  record expired (the web has already sent its jobs to the shared queue as newer attempts), and
  the `unacked` entries of jobs enqueued longer than the request timeout ago (a replica that
  was killed while it held them never acknowledges them; nobody waits for them any more).
"""
from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass

import redis

from common.keys import GENERATION_QUEUE, SWEEP_TURN_KEY, replica_key

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 5.0
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport's keys
OWN_QUEUES = f"{GENERATION_QUEUE}@*"


@dataclass
class Swept:
    queues: list[str]  # own queues of dead replicas, deleted
    unacked: int  # stale unacknowledged jobs dropped


def queue_ttl(request_timeout: float) -> int:
    return max(1, int(request_timeout) + 1)


def take_sweep_turn(connection: redis.Redis, holder: str) -> bool:
    """Whether `holder` sweeps this interval: the first replica to ask in an interval does."""
    turn_ms = int(SWEEP_INTERVAL_S * 1000 * 0.9)  # gone before the next interval's askers come
    return bool(connection.set(SWEEP_TURN_KEY, holder, nx=True, px=turn_ms))


def sweep(connection: redis.Redis, request_timeout: float, now: float | None = None) -> Swept:
    swept = Swept(_dead_replica_queues(connection), _stale_unacked(connection, request_timeout, now or time.time()))
    if swept.queues or swept.unacked:
        log.info("queue hygiene: deleted the own queues of dead replicas %s; dropped %d stale unacknowledged job(s)",
                 swept.queues, swept.unacked)
    return swept


def _dead_replica_queues(connection: redis.Redis) -> list[str]:
    queues = [q.decode() for q in connection.scan_iter(match=OWN_QUEUES, count=100)]
    if not queues:
        return []
    pipe = connection.pipeline(transaction=False)
    for queue in queues:
        pipe.exists(replica_key(queue[len(GENERATION_QUEUE) + 1:]))
    dead = [queue for queue, alive in zip(queues, pipe.execute()) if not alive]
    if dead:
        connection.delete(*dead)
    return dead


def _stale_unacked(connection: redis.Redis, request_timeout: float, now: float) -> int:
    stale = [tag for tag, raw in connection.hscan_iter(UNACKED, count=100)
             if (enqueued := _enqueued_at(raw)) is not None and now - enqueued > request_timeout]
    if stale:
        pipe = connection.pipeline(transaction=False)
        pipe.hdel(UNACKED, *stale)
        pipe.zrem(UNACKED_INDEX, *stale)
        pipe.execute()
    return len(stale)


def _enqueued_at(raw: bytes) -> float | None:
    """When the web enqueued the job of an `unacked` entry (kombu: [message, exchange, routing
    key]; the body holds the task's [args, kwargs, embed], args[0] the job); None if unreadable."""
    try:
        message = json.loads(raw)[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return float(json.loads(body)[0][0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
