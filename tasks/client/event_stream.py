"""One request's events, as the web reads them, with its deadlines and its failover.

Why the web re-enqueues (and not Celery): a replica that is SIGKILLed leaves its jobs in
kombu's `unacked` hash, and the Redis transport hands them out again only after the visibility
timeout (longer than the longest generation, so minutes) or on a warm shutdown, which a dead
process never does. The web, which waits on the request's channel anyway, notices much sooner:

- once a replica took the job (its `started` event names it), the web checks every
  `replica_check_interval` that the replica's heartbeat record still exists (it expires
  `heartbeat_ttl` after the process dies);
- before any replica took it, the web watches the replicas that could hold it: one that was
  active and whose record vanished may have died holding the job (fetched, not yet started).

Then it sends the job again with `attempt + 1` (same request id, channel, seed and input), after
writing the attempt number to Redis (`common.keys.attempt_key`): a replica that later takes an
older attempt (Celery's own redelivery, or a copy still queued) skips it, and events that a
stale attempt still publishes are dropped here (each carries its attempt). So each request is
answered once: only the current attempt's final event ends it. A stream gets an EVENT_RETRY
marker; the new run replays tokens from index 1, which the web checks against those it sent.
With no replica left that could serve, the request fails at once with a clear error.

A job sent to a replica's own queue (prefix affinity, tasks.client.affinity) that the replica
has not taken within `affinity_wait`, or whose replica stops being active (drains, dies), is sent
to the shared queue the same way, as a newer attempt (not counted as a redelivery).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import redis
from kombu.exceptions import OperationalError

from common.settings import Settings
from common.states import SERVING_STATES, ReplicaState
from common.protocol import (
    EVENT_ALIVE,
    EVENT_ERROR,
    EVENT_FINAL,
    EVENT_RETRY,
    EVENT_STARTED,
    EVENT_TOKEN,
    FailureReason,
    Job,
    StreamEvent,
)
from tasks.client.affinity import Routing
from tasks.client.subscriber import Subscription

log = logging.getLogger(__name__)

NO_REPLICA = "no replica is available to serve the request"


class ReplicaWatch:
    """What the stream asks about the replicas (GenerationClient implements it)."""

    def settled(self) -> bool: ...  # Redis answers, and has for a heartbeat period (records rewritten)
    def alive(self, name: str) -> bool: ...
    def replica_states(self, max_age: float) -> dict[str, str]: ...  # name -> state of every live replica
    def resubmit(self, job: Job) -> None: ...  # a newer attempt, on the shared queue
    def served(self, routing: Routing, replica: str) -> None: ...  # `replica` started the job


def serving(states: dict[str, str]) -> bool:
    return any(state in SERVING_STATES for state in states.values())


def error(message: str, reason: FailureReason) -> StreamEvent:
    return StreamEvent(kind=EVENT_ERROR, error=message, error_type="generation", reason=reason)


class EventStream:
    """Iterates one request's events; yields None on idle ticks (time for an SSE keep-alive)."""

    def __init__(self, subscription: Subscription, settings: Settings,
                 job: Job | None = None, watch: ReplicaWatch | None = None, states: dict | None = None,
                 routing: Routing | None = None):
        self._subscription = subscription
        self._settings = settings
        self._job = job
        self._watch = watch
        self._candidates = dict(states or {})  # replicas that may hold the job before it starts
        self._routing = routing or Routing()
        self.attempt = job.attempt if job else 0
        self.redeliveries = 0  # re-enqueues because a replica died (a reroute from a replica's own queue is not one)
        self.replica: str | None = None
        self.closed = False

    def events(self, tick: float | None = None) -> Iterator[StreamEvent | None]:
        """Yield events until final or error. Deadlines: `queue_timeout` until a replica takes
        the job, `request_timeout` overall; a replica whose heartbeat stopped is replaced (see
        the module doc); `replica_silence_timeout` between any two events of a started request,
        streaming or not (a replica sends `alive` events while it works on it)."""
        s = self._settings
        tick = tick or s.keep_alive_interval
        check_every = s.replica_check_interval
        started_at = last_event = last_idle = time.monotonic()
        next_check = started_at + check_every if self._watch is not None else float("inf")
        tokens_seen = False
        while True:
            now = time.monotonic()
            deadline = self._deadline(now, started_at, last_event, tokens_seen)
            if deadline is not None:
                retry = self._after_interruption(deadline)
                yield retry or deadline
                if retry is None or retry.kind == EVENT_ERROR:
                    return
                last_event, tokens_seen = time.monotonic(), False
                continue
            if self._watch is not None and now >= next_check:
                next_check = now + check_every
                outcome = self._check()
                if isinstance(outcome, StreamEvent):
                    yield outcome
                    if outcome.kind == EVENT_ERROR:
                        return
                    last_event, tokens_seen = time.monotonic(), False
            data = self._subscription.get(timeout=max(0.0, min(tick - (now - last_idle), next_check - now)))
            if data is None:
                if time.monotonic() - last_idle >= tick:
                    last_idle = time.monotonic()
                    yield None
                continue
            event = StreamEvent.decode(data)
            if (event.attempt or 0) != self.attempt:
                continue  # from a run this request gave up on
            self._subscription.interrupted = False  # its run is heard again: nothing was lost for good
            last_event = time.monotonic()
            if event.kind == EVENT_ALIVE:
                continue  # only resets the silence deadline
            last_idle = last_event
            if event.kind == EVENT_STARTED:
                self.replica = event.replica
                if self._watch is not None and event.replica:
                    self._watch.served(self._routing, event.replica)
            tokens_seen = tokens_seen or event.kind == EVENT_TOKEN
            yield event
            if event.kind in (EVENT_FINAL, EVENT_ERROR):
                return

    def _deadline(self, now: float, started_at: float, last_event: float, tokens_seen: bool) -> StreamEvent | None:
        s = self._settings
        if now - started_at > s.request_timeout:
            return error(f"the request did not finish within {s.request_timeout:g} s", FailureReason.REQUEST_TIMEOUT)
        picked_up = self.replica is not None or tokens_seen
        if not picked_up and now - last_event > s.queue_timeout:
            return error("no replica took the request in time", FailureReason.QUEUE_TIMEOUT)
        if picked_up and now - last_event > s.replica_silence_timeout:
            return error("replica stopped responding", FailureReason.REPLICA_SILENT)
        return None

    def _after_interruption(self, deadline: StreamEvent) -> StreamEvent | None:
        """A request silent past its queue or silence deadline since the web's subscription came
        back may have lost its events while it was away, with Redis up all along (the connection
        killed, cut): the replica saw nobody listening, and dropped its final or cancelled it. It
        is sent again (the failover's retry), not failed; None when that does not apply."""
        if not self._subscription.interrupted or self._watch is None or \
                deadline.reason not in (FailureReason.QUEUE_TIMEOUT, FailureReason.REPLICA_SILENT):
            return None
        self._subscription.interrupted = False
        try:
            return self._fail_over("its events were lost while the web's subscription reconnected")
        except (redis.RedisError, OSError, OperationalError) as lost:
            log.info("request %s: cannot send it again (%s)", self._job and self._job.request_id, lost)
            return None

    def _check(self) -> StreamEvent | None:
        """Fail over when the replica holding the job died; None when all is well."""
        watch = self._watch
        if not watch.settled():
            return None  # Redis is down, or just back and empty: judge no replica until heartbeats are in
        try:
            if self.replica is not None:
                if watch.alive(self.replica):
                    return None
                return self._fail_over(f"replica {self.replica} stopped")
            states = watch.replica_states(self._settings.replica_check_interval)
            if self._waits_in_vain(states):
                self._reroute(states)
                return None
            # Vanished while active (a clean stop drains first, and holds no job when it goes).
            lost = [n for n, state in self._candidates.items() if n not in states and state == ReplicaState.ACTIVE]
            self._candidates = states
            if lost:
                return self._fail_over(f"replica {lost[0]} stopped while the request was queued")
            if not serving(states) and not self._settings.cold_starts:  # else a replica is on its way
                return error(NO_REPLICA, FailureReason.NO_REPLICA)
            if not serving(states):  # unless the one on its way could not load: no point waiting on
                return self._cold_start_failed()
        except (redis.RedisError, OSError, OperationalError) as lost:  # an outage: wait it out, within the deadlines
            log.info("request %s: cannot check its replicas (%s); waiting", self._job and self._job.request_id, lost)
        return None

    def _cold_start_failed(self) -> StreamEvent | None:
        """An error naming why its model's replica could not load since the request was queued."""
        load_failure = getattr(self._watch, "load_failure", None)
        reason = load_failure(self._job.enqueued_at) if load_failure and self._job is not None else None
        return error(f"{NO_REPLICA}: {reason}", FailureReason.NO_REPLICA) if reason else None

    def _fail_over(self, why: str) -> StreamEvent:
        states = self._watch.replica_states(0)
        if not serving(states) and not self._settings.cold_starts:
            return error(f"{why} and {NO_REPLICA}", FailureReason.NO_REPLICA)
        if self._job is None or self.redeliveries >= self._settings.max_redeliveries:
            return error(f"{why} and the request was retried {self.redeliveries} time(s) already",
                         FailureReason.REDELIVERIES_EXHAUSTED)
        self.redeliveries += 1
        self.attempt += 1
        self._job.attempt = self.attempt
        log.warning("request %s: %s; re-enqueued as attempt %d", self._job.request_id, why, self.attempt)
        self._watch.resubmit(self._job)
        self.replica, self._candidates = None, states
        return StreamEvent(kind=EVENT_RETRY, error=why, attempt=self.attempt)

    def _waits_in_vain(self, states: dict[str, str]) -> bool:
        """The job sits in a replica's own queue that replica will not (or did not soon) take from."""
        routed = self._routing.replica
        if routed is None or self._job is None:
            return False
        waited = time.monotonic() - self._routing.sent_at
        return states.get(routed) != ReplicaState.ACTIVE or waited > self._settings.affinity_wait

    def _reroute(self, states: dict[str, str]) -> None:
        """Send the job to the shared queue as a newer attempt: the stale copy in the replica's
        own queue is skipped if it is ever taken (and its events dropped here)."""
        log.info("request %s: not taken from %s's own queue; sent to the shared queue", self._job.request_id,
                 self._routing.replica)
        self.attempt += 1
        self._job.attempt = self.attempt
        self._watch.resubmit(self._job)
        self._routing = replace(self._routing, replica=None)
        self._candidates = states

    def close(self) -> None:
        """Unsubscribe: the replica's next PUBLISH reaches no one, and it cancels the request."""
        self.closed = True
        self._subscription.close()
