"""A replica's lifecycle, as the replica itself observes it.

    loading ──► active ──► draining ──► standby ──► (active again | stopped)

The transitions are made with Celery's own remote control (`add_consumer` / `cancel_consumer`
on the generation queue, `shutdown` to one named worker), by our control plane or by an operator
with the `celery control` command; the replica only *observes* its consumer and its in-flight
requests, so its published state agrees with `celery inspect active_queues` whoever acted:

- active: consuming the generation queue;
- draining: not consuming, still running (or holding) requests; they all finish;
- standby: not consuming, nothing in flight, weights in memory;
- a standby replica whose slot target is `stopped` sends Celery's `shutdown` to itself.

A slot registry in Redis (`common.keys.SLOTS_KEY`) remembers every slot's last replica so that one
whose heartbeat expired without a clean stop is reported `dead`.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import redis
from celery import signals

from common.keys import GENERATION_QUEUE, slot_target_key
from common.slot_leases import claim, renew
from common.states import ReplicaState
from common.model_use import touch
from tasks.queue.hygiene import SWEEP_INTERVAL_S, sweep, take_sweep_turn

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02  # how often a replica looks at its consumer (a state change is published at once)
_worker_ready = threading.Event()  # this process's Celery worker has started its consumer


@signals.worker_ready.connect
def _on_worker_ready(**_):
    _worker_ready.set()


def observed_state(loaded: bool, consuming: bool, in_flight: int) -> ReplicaState:
    if not loaded:
        return ReplicaState.LOADING
    if consuming:
        return ReplicaState.ACTIVE
    return ReplicaState.DRAINING if in_flight else ReplicaState.STANDBY


def consuming_generation(worker, queue: str = GENERATION_QUEUE) -> bool:
    """Whether a Celery WorkController's consumer takes jobs from the (model's) generation queue now."""
    consumer = getattr(worker, "consumer", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return False
    try:
        return bool(task_consumer.consuming_from(queue))
    except Exception:  # the consumer is being rebuilt (reconnect): not consuming this instant
        return False


def reserved_jobs() -> int:
    """Jobs this worker has taken off the queue and not finished (running or about to)."""
    from celery.worker import state as worker_state

    return len(worker_state.reserved_requests)


def claim_slot(connection: redis.Redis, owner: str, lease_s: float = 60.0, limit: int = 1024) -> int:
    """The lowest slot whose lease nobody holds (`--slot auto`, e.g. `docker compose --scale`),
    claimed atomically like every start's (common/slot_leases.py); the heartbeat renews it."""
    for slot in range(limit):
        if claim(connection, slot, owner, ttl=int(lease_s)):
            return slot
    raise RuntimeError(f"no free replica slot below {limit}")


class Lifecycle:
    """Watches one replica (its Celery worker and engine) and publishes every state change."""

    def __init__(self, replica, shutdown):
        """`shutdown(name)`: sends Celery's shutdown to the named worker."""
        self.replica = replica
        self.queue = replica.settings.catalog.for_slot(replica.slot).queue  # its model's shared queue
        self._shutdown = shutdown
        self._shutdown_sent = False
        self._holds_slot = False  # its first heartbeat takes the lease from its starter; later ones only renew it
        self._lost_slot = False
        self.state = ReplicaState.LOADING

    def observe(self) -> str:
        r = self.replica
        stats = r.engine.stats() if r.engine is not None else None
        in_flight = reserved_jobs() + (stats.running + stats.waiting if stats else 0)
        loaded = r.engine is not None and r.loaded and (_worker_ready.is_set() or r.worker is None)
        return observed_state(loaded, consuming_generation(r.worker, self.queue), in_flight)

    def run(self, stop: threading.Event, heartbeat_interval: float) -> None:
        # The sweep SCANs the keyspace (seconds with millions of affinity keys): in a thread of
        # its own, never delaying a heartbeat (a late one reads as a dead replica).
        threading.Thread(target=self._sweep, args=(stop,), name="queue-hygiene", daemon=True).start()
        last_beat = 0.0
        while not stop.wait(POLL_INTERVAL):
            try:
                state = self.observe()
                if stop.is_set():  # stopping: `stopped()` has the last word
                    return
                changed = state != self.state
                if changed:
                    log.info("replica %s: %s -> %s", self.replica.name, self.state, state)
                    self.state = state
                    if state == ReplicaState.ACTIVE:
                        self._used_now()
                now = time.monotonic()
                if changed or now - last_beat >= heartbeat_interval:
                    last_beat = now
                    self.replica.publish_record()
                    self.register(state)
                    self.stop_when_told(state)
            except redis.RedisError as error:
                log.warning("heartbeat failed: %s", error)

    def _used_now(self) -> None:
        """Turning active counts as a use of its model (docs/models.md): it takes its model's queued
        requests now, but its record shows them only at its next heartbeat; meanwhile the model
        must look neither idle to scale to zero nor least recently used to an eviction."""
        touch(self.replica.redis, self.replica.settings.served_model)

    def _sweep(self, stop: threading.Event) -> None:
        """No job of an ended request left in Redis (tasks/queue/hygiene.py): every SWEEP_INTERVAL_S,
        by whichever replica takes the turn."""
        while not stop.wait(SWEEP_INTERVAL_S):
            try:
                if take_sweep_turn(self.replica.redis, self.replica.name):
                    sweep(self.replica.redis, self.replica.settings.request_timeout)
            except redis.RedisError as error:
                log.warning("queue hygiene failed: %s", error)
            except Exception:  # a hint of hygiene: the next pass tries again
                log.exception("queue hygiene failed")

    def register(self, state: str, ttl: int | None = None, **extra) -> None:
        """The slot's lease (`ttl` 0: ended) and registry entry, while this replica holds the slot.
        One whose slot went to another start (its record expired: a late heartbeat) stops."""
        r = self.replica
        if self._lost_slot:
            return
        entry = {"slot": r.slot, "name": r.name, "host": r.settings.host, "device": r.device_name, "pid": os.getpid(),
                 "state": state, "by": "replica", "updated_at": time.time(), **extra}
        ttl = max(5, int(r.settings.heartbeat_ttl) * 3) if ttl is None else ttl
        if renew(r.redis, r.slot, r.name, entry, ttl, take=not self._holds_slot):
            self._holds_slot = True
            return
        self._lost_slot = True
        log.error("replica %s: slot %d was given to another start while this replica's heartbeat was late; "
                  "draining and stopping", r.name, r.slot)
        if ttl and not self._shutdown_sent:  # (ttl 0: it is stopping already)
            self._shutdown_sent = True
            self._shutdown(r.name)

    def stop_when_told(self, state: str) -> None:
        if state != ReplicaState.STANDBY or self._shutdown_sent:
            return
        target = self.replica.redis.get(slot_target_key(self.replica.slot))
        if target is not None and target.decode() == ReplicaState.STOPPED:
            log.info("replica %s drained; shutting down (slot target: stopped)", self.replica.name)
            self._shutdown_sent = True
            self._shutdown(self.replica.name)

    def cannot_load(self, message: str) -> None:
        """The model or an adapter cannot load: the slot is `dead` with the reason, marked as a
        configuration error (the autoscaler backs off, `serve` exits: docs/failure-policy.md)."""
        self.state = ReplicaState.DEAD
        try:
            self.register(ReplicaState.DEAD, ttl=0, error=message, cannot_load=True)
        except redis.RedisError:
            pass

    def stopped(self) -> None:
        """A clean exit: the slot is `stopped`, not `dead`."""
        if self.state == ReplicaState.DEAD:  # it could not load: `cannot_load` had the last word
            return
        self.state = ReplicaState.STOPPED
        try:
            self.register(ReplicaState.STOPPED, ttl=0)
        except redis.RedisError:
            pass
