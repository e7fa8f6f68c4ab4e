"""Publish the engine's token events to the requests' stream channels, one Redis pipeline per
engine step, from a thread of its own (the engine loop never waits on Redis, and a replica
does one round trip per step instead of one per token).

A PUBLISH that reaches nobody means the client went away: the request is cancelled in the
engine, which frees its batch slot within a step.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import redis

from engine.outputs import TokenEvent
from tasks.keys import stream_channel
from tasks.protocol import EVENT_TOKEN, StreamEvent

log = logging.getLogger(__name__)


class StreamRelay:
    def __init__(self, connection: redis.Redis, cancel: Callable[[str], None]):
        self._redis = connection
        self._cancel = cancel
        self._streaming: dict[str, tuple[str, int]] = {}  # engine request id -> (channel id, attempt)
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stream-relay", daemon=True)
        self._thread.start()

    def register(self, request_id: str, channel_id: str | None = None, attempt: int = 0) -> None:
        """Stream the tokens of engine request `request_id` on `channel_id`'s channel (the
        same id unless the job is a re-run: see tasks.generate), marked with its attempt."""
        with self._lock:
            self._streaming[request_id] = (channel_id or request_id, attempt)

    def on_step(self, events: list[TokenEvent]) -> None:
        """Engine step listener (loop thread): hand the step's events over, nothing more."""
        self._outbox.put(events)

    def publish_now(self, request_id: str, event: StreamEvent) -> bool:
        """Publish at once, from the caller's thread; False when nobody listens."""
        return self._redis.publish(stream_channel(request_id), event.encode()) > 0

    def send(self, request_id: str, event: StreamEvent, engine_id: str | None = None) -> None:
        """Queue a final or error event; it goes out after every token queued before it and
        ends the streaming of `engine_id` (default: `request_id`)."""
        self._outbox.put((request_id, event, engine_id or request_id))

    def _run(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while not self._outbox.empty():  # everything that piled up: one pipeline
                batch.append(self._outbox.get_nowait())
            try:
                self._publish(batch)
            except redis.RedisError as error:
                log.warning("stream relay could not publish %d item(s): %s", len(batch), error)

    def _publish(self, batch: list) -> None:
        pipe = self._redis.pipeline(transaction=False)
        sent: list[str | None] = []  # the request id of each token message, None for finals
        with self._lock:
            streaming = dict(self._streaming)
        for item in batch:
            if isinstance(item, tuple):
                request_id, event, engine_id = item
                pipe.publish(stream_channel(request_id), event.encode())
                sent.append(None)
                with self._lock:
                    self._streaming.pop(engine_id, None)
                continue
            for event in item:
                if event.request_id in streaming:
                    channel_id, attempt = streaming[event.request_id]
                    message = StreamEvent(kind=EVENT_TOKEN, index=event.index, token=event.token.to_dict(),
                                          top_tokens=[t.to_dict() for t in event.top_tokens] or None,
                                          attempt=attempt or None)
                    pipe.publish(stream_channel(channel_id), message.encode())
                    sent.append(event.request_id)
        if not sent:
            return
        for request_id, receivers in zip(sent, pipe.execute()):
            if request_id is not None and receivers == 0:
                self._client_gone(request_id)

    def _client_gone(self, request_id: str) -> None:
        with self._lock:
            if self._streaming.pop(request_id, None) is None:
                return
        log.info("request %s: client went away, cancelling", request_id)
        self._cancel(request_id)
