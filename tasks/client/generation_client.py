"""The web's side of the queue: subscribe to a request's stream, then enqueue its job.

Connections scale with web processes, never with requests (docs/request-path.md):
- one pub/sub connection per process (tasks.client.subscriber): its dispatcher thread hands each
  event to its request's queue; a request holds a subscription, never a connection;
- a small pool for commands (enqueue, replica checks, /metrics), each held for one command;
- a reserved pool for the admission leases and /health, so a burst never starves them.
Every connection is named `blitz-web-<pid>` (`CLIENT LIST` shows a web process's share).

The subscription is confirmed before the job is sent, so no event can be published before
anyone listens. Closing the stream unsubscribes, which is how a replica learns that the client
went away (its next PUBLISH reaches no one, and it cancels the request). A job goes to the
shared queue, or to the own queue of the replica that served its prompt's prefix
(tasks.client.affinity). Deadlines, failover and outages: tasks.client.event_stream.
"""
from __future__ import annotations

import os
import threading
import time

import redis
from kombu.exceptions import OperationalError

from common.keys import attempt_key, replica_key, replica_queue, stream_channel
from common.protocol import Job
from common.replica_records import live_records
from common.settings import Settings
from common.slot_leases import load_failure, registry_entries
from tasks.client.affinity import PrefixAffinity, Routing, job_salt
from tasks.client.event_stream import NO_REPLICA, EventStream, serving
from tasks.client.subscriber import SubscribeFailed, Subscriber
from tasks.queue.celery_app import GENERATE_TASK, make_celery
from tasks.queue.depth import queued_jobs
from tasks.queue.hygiene import queue_ttl

COMMAND_CONNECTIONS = 16  # one command each (sub-millisecond): thousands of requests a second
RESERVED_CONNECTIONS = 4  # admission leases (take, renew, release) and /health


class QueueUnavailable(RuntimeError):
    """Redis (the broker) cannot be reached."""


class NoReplica(RuntimeError):
    """No replica is active or loading: a job would wait for nothing."""


def connection_name() -> str:
    return f"blitz-web-{os.getpid()}"


def web_connection_pool(settings: Settings, size: int) -> redis.BlockingConnectionPool:
    """A pool that waits its turn (up to a few seconds) when all its connections are busy, rather
    than failing (redis-py's default) or growing with the requests."""
    return redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=size, timeout=5, socket_connect_timeout=2, socket_timeout=10,
        health_check_interval=30, client_name=connection_name(),
    )


class GenerationClient:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis(connection_pool=web_connection_pool(settings, COMMAND_CONNECTIONS))
        self.reserved = redis.Redis(connection_pool=web_connection_pool(settings, RESERVED_CONNECTIONS))
        self.subscriber = Subscriber(settings.redis_url, client_name=connection_name())
        self.celery = make_celery(settings)
        self.celery.conf.broker_transport_options = {**self.celery.conf.broker_transport_options,
                                                     "client_name": connection_name()}
        self.affinity = PrefixAffinity(self.redis, settings.prefix_caching and settings.prefix_affinity,
                                       settings.affinity_wait, settings.heartbeat_interval + settings.replica_check_interval)
        self._records: tuple[float, dict[str, dict]] = (0.0, {})  # (when read, name -> replica record)
        self._records_lock = threading.Lock()  # guards the swap only: no Redis I/O under it
        self._refreshing = False

    def submit(self, job: Job) -> EventStream:
        """Subscribe to the job's channel (confirmed), then enqueue. Raises NoReplica at once when
        no replica could take the job (unless its model starts replicas on demand: it waits in the
        queue meanwhile), QueueUnavailable when Redis cannot be reached."""
        try:
            states = self.replica_states(self.settings.replica_check_interval, job.model)
            if not serving(states) and not self.settings.cold_starts:
                raise NoReplica(NO_REPLICA)
            subscription = self.subscriber.subscribe(stream_channel(job.request_id))
        except (redis.RedisError, OSError, SubscribeFailed) as error:
            raise QueueUnavailable(str(error)) from error
        try:
            routing = self.affinity.route(job.input_ids, self.model_records(job.model), salt=self._salt(job),
                                          request_id=job.request_id)
            self._send(job, routing.replica)
        except (redis.RedisError, OSError, OperationalError) as error:
            subscription.close()
            raise QueueUnavailable(str(error)) from error
        except BaseException:
            subscription.close()
            raise
        return EventStream(subscription, self.settings, job=job, watch=ModelWatch(self, job.model), states=states,
                           routing=routing)

    def _salt(self, job: Job) -> str:
        """The prefix-affinity salt: with several models, each model's prefixes are its own."""
        salt = job_salt(job.cache_salt, job.adapter_id)
        return f"{job.model}\0{salt}" if job.model else salt

    def model_records(self, model: str | None) -> dict[str, dict]:
        """The live replicas serving `model` (None: the first model, or the only one)."""
        records = self.replica_records(self.settings.replica_check_interval)
        if not self.settings.catalog.several:
            return records
        name = model or self.settings.catalog.first.name
        return {n: r for n, r in records.items() if r.get("model", self.settings.catalog.first.name) == name}

    def _send(self, job: Job, replica: str | None = None) -> None:
        """To its model's shared queue, or to `replica`'s own queue; the queue list expires once
        nobody consumed it for a request timeout (tasks/queue/hygiene.py)."""
        task_id = f"{job.request_id}.{job.attempt}" if job.attempt else job.request_id
        served = self.settings.catalog.get(job.model) or self.settings.catalog.first
        queue = replica_queue(replica) if replica else served.queue
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

    def settled(self) -> bool:
        """Redis answers, and has for a heartbeat period: after a restart (an empty server) the
        replicas' records are back before any is judged gone."""
        since = self.subscriber.healthy_since
        return since is not None and time.monotonic() - since >= self.settings.heartbeat_ttl

    def alive(self, name: str) -> bool:
        return bool(self.redis.exists(replica_key(name)))

    def replica_states(self, max_age: float, model: str | None = None) -> dict[str, str]:
        """name -> state of every live replica (of `model`'s, with several models)."""
        records = self.replica_records(max_age)
        if self.settings.catalog.several:
            first = self.settings.catalog.first.name
            records = {n: r for n, r in records.items() if r.get("model", first) == (model or first)}
        return {name: record.get("state") for name, record in records.items()}

    def replica_records(self, max_age: float) -> dict[str, dict]:
        """name -> record of every live replica, read at most every `max_age` seconds for all the
        requests of this process: one thread reads, the others use the records it read last."""
        with self._records_lock:
            read_at, records = self._records
            fresh = time.monotonic() - read_at < max_age
            if fresh or (self._refreshing and records):
                return records
            self._refreshing = True
        try:
            records = {r["name"]: r for r in self.read_replicas() if r.get("name")}
        finally:
            with self._records_lock:
                self._refreshing = False
        # No serving replica is not kept: a replica scaled up a moment later is seen at once.
        states = {name: r.get("state") for name, r in records.items()}
        with self._records_lock:
            self._records = (time.monotonic() if serving(states) else 0.0, records)
        return records

    def redis_alive(self) -> bool:
        try:
            return bool(self.reserved.ping())
        except (redis.RedisError, OSError):
            return False

    def replicas(self) -> list[dict]:
        """The records of every replica whose heartbeat has not expired; none when Redis is down."""
        try:
            return self.read_replicas()
        except (redis.RedisError, OSError):
            return []

    def read_replicas(self) -> list[dict]:
        """As `replicas`, raising when Redis cannot be read."""
        return live_records(self.redis)

    def queue_size(self) -> int:
        try:
            return self.read_queue_size()
        except (redis.RedisError, OSError):
            return 0

    def read_queue_size(self) -> int:
        """Jobs waiting in the shared queue and in the live replicas' own queues, raising when
        Redis cannot be read."""
        return queued_jobs(self.redis, self.replica_records(self.settings.replica_check_interval),
                           [m.queue for m in self.settings.catalog.models])


class ModelWatch:
    """What a waiting request asks about the replicas (tasks.client.event_stream.ReplicaWatch),
    narrowed to the replicas of its model."""

    def __init__(self, client: GenerationClient, model: str | None):
        self._client, self._model = client, model

    def settled(self) -> bool:
        return self._client.settled()

    def alive(self, name: str) -> bool:
        return self._client.alive(name)

    def replica_states(self, max_age: float) -> dict[str, str]:
        return self._client.replica_states(max_age, self._model)

    def resubmit(self, job: Job) -> None:
        self._client.resubmit(job)

    def served(self, routing: Routing, replica: str) -> None:
        self._client.served(routing, replica)

    def load_failure(self, since: float) -> str | None:
        """Why a replica of this model could not load after `since` (a timestamp), if one did:
        a request waiting for a cold start then fails saying so, not at the queue timeout."""
        catalog = self._client.settings.catalog
        own = (catalog.get(self._model) or catalog.first).slots
        return load_failure(registry_entries(self._client.redis, own), since)
