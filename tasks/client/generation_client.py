"""The web's side of the queue: subscribe to a request's stream, then enqueue its job.

One Redis pub/sub connection per in-flight request; the subscription is confirmed before the
job is sent, so no event can be published before anyone listens. The process's one connection
pool is sized for that (`web_connection_pool`): a burst within the admission limit never fails
for want of a connection. Closing the stream
unsubscribes, which is how a replica learns that the client went away (its next PUBLISH reaches
no one, and it cancels the request). A job goes to the shared queue, or to the own queue of the
replica that served its prompt's prefix (tasks.client.affinity). Deadlines and failover:
tasks.client.event_stream.
"""
from __future__ import annotations

import threading
import time

import redis

from common.keys import GENERATION_QUEUE, attempt_key, replica_key, replica_queue, stream_channel
from common.protocol import Job
from common.replica_records import live_records
from common.settings import Settings
from tasks.client.affinity import PrefixAffinity, Routing, job_salt
from tasks.client.event_stream import NO_REPLICA, EventStream, serving
from tasks.queue.celery_app import GENERATE_TASK, make_celery
from tasks.queue.depth import queued_jobs
from tasks.queue.hygiene import queue_ttl

class QueueUnavailable(RuntimeError):
    """Redis (the broker) cannot be reached."""


class NoReplica(RuntimeError):
    """No replica is active or loading: a job would wait for nothing."""


BACKGROUND_CONNECTIONS = 8  # the admission renewer, /metrics collectors, cluster commands


def max_choices(settings: Settings) -> int:
    """The most jobs one request enqueues, each with its own pub/sub connection held until it
    ends: /v1/completions' prompts x `n` (or `best_of`) candidates (web/openai/params.py)."""
    return max(1, settings.max_client_batch_size) * max(1, settings.max_best_of)


def web_connection_pool(settings: Settings) -> redis.BlockingConnectionPool:
    """Every thread of a web process may hold its request's pub/sub connections (one per choice,
    all held until the last ends) and run one command (admission, enqueue check, replica check)
    at the same time. redis-py's default pool (100 connections, then `Too many connections`)
    failed admitted requests under a burst; this one has room for every thread's largest
    request (connections open only when used), so requests never wait on each other's; were it
    ever short it would wait its turn (up to `queue_timeout`) rather than fail."""
    return redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.web_process_threads * (max_choices(settings) + 1) + BACKGROUND_CONNECTIONS,
        timeout=settings.queue_timeout, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30,
    )


class GenerationClient:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis(connection_pool=web_connection_pool(settings))
        self.celery = make_celery(settings)
        self.affinity = PrefixAffinity(self.redis, settings.prefix_caching and settings.prefix_affinity,
                                       settings.affinity_wait, settings.heartbeat_interval + settings.replica_check_interval)
        self._records: tuple[float, dict[str, dict]] = (0.0, {})  # (when read, name -> replica record)
        self._records_lock = threading.Lock()

    def submit(self, job: Job) -> EventStream:
        """Subscribe to the job's channel, wait for the subscription, then enqueue. Raises
        NoReplica at once when no replica could take the job."""
        channel = stream_channel(job.request_id)
        pubsub = self.redis.pubsub()
        try:
            states = self.replica_states(self.settings.replica_check_interval)
            if not serving(states):
                raise NoReplica(NO_REPLICA)
            pubsub.subscribe(channel)
            confirmation = pubsub.get_message(timeout=5)
            if not confirmation or confirmation.get("type") != "subscribe":
                raise QueueUnavailable("stream subscription was not confirmed")
            routing = self.affinity.route(job.input_ids, self.replica_records(self.settings.replica_check_interval),
                                          salt=job_salt(job.cache_salt, job.adapter_id), request_id=job.request_id)
            self._send(job, routing.replica)
        except (redis.RedisError, OSError) as error:
            pubsub.close()
            raise QueueUnavailable(str(error)) from error
        except Exception:
            pubsub.close()
            raise
        return EventStream(pubsub, channel, self.settings, job=job, watch=self, states=states, routing=routing)

    def _send(self, job: Job, replica: str | None = None) -> None:
        """To the shared queue, or to `replica`'s own queue; the queue list expires once nobody
        consumed it for a request timeout (tasks/queue/hygiene.py)."""
        task_id = f"{job.request_id}.{job.attempt}" if job.attempt else job.request_id
        queue = replica_queue(replica) if replica else GENERATION_QUEUE
        self.celery.send_task(GENERATE_TASK, args=[job.to_dict()], queue=queue, task_id=task_id)
        self.redis.expire(queue, queue_ttl(self.settings.request_timeout))

    # ReplicaWatch (tasks.client.event_stream): what a waiting request asks about the replicas.
    def resubmit(self, job: Job) -> None:
        """Enqueue a newer attempt, on the shared queue; replicas skip the older ones from now on."""
        ttl = max(1, int(self.settings.request_timeout * 2))
        self.redis.set(attempt_key(job.request_id), job.attempt, ex=ttl)
        job.enqueued_at = time.time()
        self._send(job)

    def served(self, routing: Routing, replica: str) -> None:
        self.affinity.served(routing, replica)

    def alive(self, name: str) -> bool:
        return bool(self.redis.exists(replica_key(name)))

    def replica_states(self, max_age: float) -> dict[str, str]:
        """name -> state of every live replica."""
        return {name: record.get("state") for name, record in self.replica_records(max_age).items()}

    def replica_records(self, max_age: float) -> dict[str, dict]:
        """name -> record of every live replica, read at most every `max_age` seconds for all
        the requests of this process."""
        with self._records_lock:
            read_at, records = self._records
            if time.monotonic() - read_at < max_age:
                return records
            records = {r["name"]: r for r in self._replica_records() if r.get("name")}
            # No serving replica is not kept: a replica scaled up a moment later is seen at once.
            states = {name: r.get("state") for name, r in records.items()}
            self._records = (time.monotonic() if serving(states) else 0.0, records)
            return records

    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def replicas(self) -> list[dict]:
        """The records of every replica whose heartbeat has not expired."""
        try:
            return self._replica_records()
        except (redis.RedisError, OSError):
            return []

    def _replica_records(self) -> list[dict]:
        return live_records(self.redis)

    def queue_size(self) -> int:
        try:
            names = self.replica_records(self.settings.replica_check_interval)
            return queued_jobs(self.redis, names)  # the live replicas' own queues too
        except (redis.RedisError, OSError):
            return 0
