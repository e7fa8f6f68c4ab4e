"""Publish the engine's token events to the requests' stream channels, one Redis pipeline per
engine step, from a thread of its own (the engine loop never waits on Redis, and a replica
does one round trip per step instead of one per token).

A PUBLISH that reaches nobody means the client went away: the request is cancelled in the
engine, which frees its batch slot within a step.

Failure policy (docs/failure-policy.md):
- a Redis error is retried `retries` times with exponential backoff, for the messages that
  failed only (a duplicate token, after a connection lost mid-pipeline, is dropped by the web);
- a request's last message (final or error) that still cannot go out stays pending: it is
  retried on every later pass until `give_up_after`, and the request is not failed for it (its
  generation is done, its client has lost nothing), so a Redis blip delays an answer, never
  fails it;
- a token of a stream that cannot go out fails its request (its client saw a gap): it is
  cancelled in the engine, and one error event (`incomplete_generation`) takes the place of its
  final, pending the same way;
- while a request is held or its last message pending, an `alive` event goes out whenever
  nothing else did for `alive_interval`, so that the web can fail a silent replica within its
  silence deadline, streaming or not; ticks for a held request stop when the engine has not
  stepped for `stall_after` seconds;
- right after a Redis error (`outage_grace` seconds), a PUBLISH that reaches nobody does not
  mean the client went away: the web may not have subscribed again yet (after a restart Redis
  knows no subscriber). A last message stays pending, a held request is not cancelled;
- any other exception is logged with its traceback, fails the requests of that pass, and the
  relay goes on.

One live attempt per request: every pass reads the current attempt of each held request
(`common.keys.attempt_key`, one MGET); a run whose request the web re-enqueued as a newer
attempt is cancelled in the engine (its row goes at the next step) and sends nothing more. The
web drops an older attempt's events anyway: without this, the GPU would generate them for no one.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common.keys import attempt_key, stream_channel
from common.protocol import EVENT_ALIVE, EVENT_ERROR, EVENT_FINAL, EVENT_TOKEN, FailureReason, StreamEvent
from engine.outputs import TokenEvent

log = logging.getLogger(__name__)

PUBLISH_FAILED = "the replica could not publish the request's events"


def publish_failed(attempt: int | None) -> StreamEvent:
    """The error event of a request whose events could not go out."""
    return StreamEvent(kind=EVENT_ERROR, error=PUBLISH_FAILED, error_type="incomplete_generation",
                       reason=FailureReason.PUBLISH_FAILED, attempt=attempt)


@dataclass
class _Held:
    """A request the relay speaks for: its channel, attempt, and when it last sent anything."""

    channel: str
    attempt: int
    stream: bool  # tokens go out; else only `alive` ticks until the final event
    registered: float
    last_sent: float
    rows: tuple[str, ...]  # the engine requests a cancel stops (best_of runs several: `<id>/<n>`)


@dataclass
class _Message:
    channel: str
    event: StreamEvent
    engine_id: str | None  # the held request it belongs to (None: a pending last message)
    keep_for: float | None = None  # a last message: how long it may wait for Redis (None: give_up_after)

    @property
    def is_last(self) -> bool:
        """A final or error event: the request's last message."""
        return self.event.kind in (EVENT_FINAL, EVENT_ERROR)


@dataclass
class _Pending:
    """A request's last message that Redis has not taken yet."""

    message: _Message
    until: float  # monotonic time after which nobody waits for it
    last_tick: float  # when an `alive` tick last went out for it


class StreamRelay:
    def __init__(self, connection: redis.Redis, cancel: Callable[[str], None], *, alive_interval: float = 5.0,
                 stall_after: float = 30.0, retries: int = 4, backoff: float = 0.1, give_up_after: float = 60.0,
                 outage_grace: float = 5.0):
        self._redis = connection
        self._cancel = cancel
        self._alive_interval = alive_interval
        self._stall_after = stall_after
        self._retries = retries
        self._backoff = backoff
        self._give_up_after = give_up_after  # set it to the web's silence deadline: nobody waits longer
        self._outage_grace = outage_grace  # the web's time to subscribe again after a Redis outage
        self._last_error = -float("inf")  # monotonic time of the last failed PUBLISH
        self._held: dict[str, _Held] = {}  # engine request id -> what the relay sends for it
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # channel -> last message not yet out (relay thread)
        self._last_step = time.monotonic()
        self._attempts_paused_until = 0.0  # after a failed read of the attempts (see _cancel_superseded)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued, then end the thread."""
        self._stopped.set()
        self._outbox.put([])  # wakes the thread
        self._thread.join(timeout)

    # ---- called by the task threads and the engine loop --------------------------------------
    def register(self, request_id: str, channel_id: str | None = None, attempt: int = 0,
                 stream: bool = True, rows: tuple[str, ...] = ()) -> None:
        """Speak for engine request `request_id` on `channel_id`'s channel (the same id unless
        the job is a re-run: see tasks.runtime.generate), marked with its attempt: its tokens when it
        streams, `alive` ticks in any case, until its final event is sent. `rows`: the engine
        requests that cancelling it stops (default: `request_id` alone)."""
        now = time.monotonic()
        with self._lock:
            self._held[request_id] = _Held(channel_id or request_id, attempt, stream, now, now,
                                           tuple(rows) or (request_id,))

    def forget(self, request_id: str) -> None:
        """The request ended without a final event (cancelled): nothing more to send for it."""
        with self._lock:
            self._held.pop(request_id, None)

    def on_step(self, events: list[TokenEvent]) -> None:
        """Engine step listener (loop thread): hand the step's events over, nothing more."""
        self._last_step = time.monotonic()
        self._outbox.put(events)

    def publish_now(self, request_id: str, event: StreamEvent) -> bool:
        """Publish at once, from the caller's thread (with the relay's retries); False when
        nobody listens. Raises the last Redis error when every try failed."""
        message = _Message(stream_channel(request_id), event, None)
        replies, failed, error = self._publish([message])
        if failed:
            raise error
        return replies[0] > 0

    def send(self, request_id: str, event: StreamEvent, engine_id: str | None = None,
             keep_for: float | None = None) -> None:
        """Queue a final or error event; it goes out after every token queued before it and
        ends the relaying of `engine_id` (default: `request_id`). `keep_for`: how long it may
        wait for Redis, when the web waits longer than `give_up_after` for it."""
        self._outbox.put((request_id, event, engine_id or request_id, keep_for))

    # ---- the relay thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set() or not self._outbox.empty():
            batch = self._take()
            try:
                self._relay(batch)
            except Exception:  # a bug must not end the thread: every held request would hang
                log.exception("stream relay: unexpected error; failing the requests of this pass")
                self._fail_all(batch)

    def _take(self) -> list:
        """What piled up since the last pass (one pipeline), or nothing after a tick's wait."""
        tick = min(self._alive_interval, 0.5) if self._pending else self._alive_interval / 2
        try:
            batch = [self._outbox.get(timeout=tick)]
        except queue.Empty:
            return []
        while not self._outbox.empty():
            batch.append(self._outbox.get_nowait())
        return batch

    def _relay(self, batch: list) -> None:
        self._cancel_superseded()
        messages = self._messages(batch) + self._alive_ticks() + [p.message for p in self._pending.values()]
        if not messages:
            return
        replies, failed, error = self._publish(messages)
        failed_ids = {id(m) for m in failed}
        just_back = time.monotonic() - self._last_error < self._outage_grace  # nobody may listen yet
        for message, receivers in zip(messages, replies):
            if id(message) in failed_ids:
                continue
            if message.is_last and receivers == 0 and just_back:
                self._keep_pending(message, "no subscriber yet after an outage")
            elif message.is_last:
                self._delivered(message)
            elif receivers == 0 and message.engine_id is not None and not just_back:
                self._client_gone(message.engine_id)
        for message in failed:
            self._give_up(message, error)
        self._expire_pending()

    def _messages(self, batch: list) -> list[_Message]:
        """The step's token events of streaming requests, and the final/error events queued."""
        messages: list[_Message] = []
        now = time.monotonic()
        with self._lock:
            for item in batch:
                if isinstance(item, tuple):  # a final or error event: the request's last message
                    request_id, event, engine_id, keep_for = item
                    self._held.pop(engine_id, None)
                    if stream_channel(request_id) in self._pending:
                        continue  # already failed (it lost tokens): its error event stands
                    messages.append(_Message(stream_channel(request_id), event, engine_id, keep_for))
                    continue
                for event in item:
                    held = self._held.get(event.request_id)
                    if held is None or not held.stream:
                        continue
                    held.last_sent = now
                    messages.append(_Message(stream_channel(held.channel), _token_event(event, held.attempt),
                                             event.request_id))
        return messages

    def _alive_ticks(self) -> list[_Message]:
        """Ticks for held requests while the engine steps, and for pending last messages (their
        generation is done: only Redis keeps them waiting)."""
        now = time.monotonic()
        ticks = []
        with self._lock:
            for engine_id, held in self._held.items():
                stalled = now - max(self._last_step, held.registered) > self._stall_after
                if now - held.last_sent >= self._alive_interval and not stalled:
                    held.last_sent = now
                    ticks.append(_Message(stream_channel(held.channel),
                                          StreamEvent(kind=EVENT_ALIVE, attempt=held.attempt or None), engine_id))
        for channel, pending in self._pending.items():
            if now - pending.last_tick >= self._alive_interval:
                pending.last_tick = now
                ticks.append(_Message(channel, StreamEvent(kind=EVENT_ALIVE, attempt=pending.message.event.attempt),
                                      None))
        return ticks

    def _publish(self, messages: list[_Message]) -> tuple[list, list[_Message], Exception | None]:
        """PUBLISH each message, retrying those that failed; returns (receivers or None per
        message, the messages that never went out, the last error)."""
        replies: list = [None] * len(messages)
        remaining = list(range(len(messages)))
        error: Exception | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            pipe = self._redis.pipeline(transaction=False)
            for i in remaining:
                pipe.publish(messages[i].channel, messages[i].event.encode())
            try:
                results = pipe.execute(raise_on_error=False)
            except (redis.RedisError, OSError) as lost:  # the connection failed: none is known to be out
                results = [lost] * len(remaining)
            still = []
            for i, result in zip(remaining, results):
                if isinstance(result, Exception):
                    still.append(i)
                    error = result
                else:
                    replies[i] = result
            remaining = still
            if not remaining:
                break
            self._last_error = time.monotonic()
            log.warning("stream relay: %d message(s) not published (try %d of %d): %s",
                        len(remaining), attempt + 1, self._retries + 1, error)
        return replies, [messages[i] for i in remaining], error

    def _give_up(self, message: _Message, error: Exception | None) -> None:
        """A message that every try failed: an `alive` tick is only skipped; a last message waits
        for Redis (pending); a token fails its request (see the module doc)."""
        if message.event.kind == EVENT_ALIVE:
            return
        if message.is_last:
            self._keep_pending(message, error)
            return
        log.error("request on %s: %s (%s); failing it", message.channel, PUBLISH_FAILED, error)
        self._fail(message.engine_id, message.channel, message.event.attempt)

    def _keep_pending(self, message: _Message, error) -> None:
        if message.channel in self._pending:
            return  # already waiting; it stays until Redis takes it or it expires
        log.warning("stream relay: the %s event on %s is not published yet (%s); retrying it until Redis "
                    "takes it", message.event.kind, message.channel, error)
        self._pend(message.channel, message.event, message.keep_for)

    def _pend(self, channel: str, event: StreamEvent, keep_for: float | None = None) -> None:
        now = time.monotonic()
        keep_for = self._give_up_after if keep_for is None else keep_for
        self._pending[channel] = _Pending(_Message(channel, event, None, keep_for), now + keep_for, now)

    def _delivered(self, message: _Message) -> None:
        if self._pending.pop(message.channel, None) is not None:
            log.info("stream relay: the %s event on %s went out after waiting for Redis", message.event.kind,
                     message.channel)

    def _fail(self, engine_id: str, channel: str, attempt: int | None) -> None:
        with self._lock:
            held = self._held.pop(engine_id, None)
        if held is not None:
            self._cancel_rows(held)
        if channel not in self._pending:
            self._pend(channel, publish_failed(attempt))

    def _fail_all(self, batch: list) -> None:
        """After an unexpected error: fail the requests whose events the pass held (never raises)."""
        try:
            for item in batch:
                if isinstance(item, tuple):
                    request_id, event, engine_id, _ = item
                    self._fail(engine_id, stream_channel(request_id), event.attempt)
                    continue
                with self._lock:
                    lost = {e.request_id: self._held[e.request_id] for e in item
                            if e.request_id in self._held and self._held[e.request_id].stream}
                for engine_id, held in lost.items():
                    self._fail(engine_id, stream_channel(held.channel), held.attempt or None)
        except Exception:
            log.exception("stream relay: could not fail the requests of a broken pass")

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for channel, pending in list(self._pending.items()):
            if now > pending.until:
                del self._pending[channel]
                log.error("stream relay: gave up publishing the %s event on %s; the web's silence "
                          "deadline ends that request", pending.message.event.kind, channel)

    def _cancel_superseded(self) -> None:
        """Cancel each held run whose request has a newer attempt (see the module doc)."""
        with self._lock:
            held = [(engine_id, h.channel, h.attempt) for engine_id, h in self._held.items()]
        if not held or time.monotonic() < self._attempts_paused_until:
            return
        try:
            current = self._redis.mget([attempt_key(channel) for _, channel, _ in held])
        except (redis.RedisError, OSError) as error:  # a hint only: read again a second later,
            log.debug("stream relay: could not read the requests' attempts: %s", error)
            self._attempts_paused_until = time.monotonic() + 1.0  # not a timeout on every pass of an outage
            return
        for (engine_id, channel, attempt), newest in zip(held, current):
            if newest is None or int(newest) <= attempt:
                continue
            with self._lock:
                superseded = self._held.pop(engine_id, None)
            if superseded is None:
                continue
            log.info("request %s: attempt %d superseded by attempt %d; cancelling it", channel, attempt, int(newest))
            self._cancel_rows(superseded)

    def _client_gone(self, request_id: str) -> None:
        with self._lock:
            held = self._held.pop(request_id, None)
        if held is None:
            return
        log.info("request %s: client went away, cancelling", request_id)
        self._cancel_rows(held)

    def _cancel_rows(self, held: _Held) -> None:
        for row in held.rows:
            self._cancel(row)


def _token_event(event: TokenEvent, attempt: int) -> StreamEvent:
    """A streamed token; the first carries the prompt's logprobs when the job asked for them."""
    prefill_top = event.prefill_top_tokens
    return StreamEvent(
        kind=EVENT_TOKEN, index=event.index, token=event.token.to_dict(),
        top_tokens=[t.to_dict() for t in event.top_tokens] or None,
        prefill=[t.to_dict() for t in event.prefill] if event.prefill else None,
        prefill_top_tokens=[[t.to_dict() for t in top] for top in prefill_top] if prefill_top else None,
        attempt=attempt or None)
