"""The web's side of the queue: subscribe to a request's stream, then enqueue its job.

One Redis pub/sub connection per in-flight request; the subscription is confirmed before the
job is sent, so no event can be published before anyone listens. Closing the stream
unsubscribes, which is how a replica learns that the client went away (its next PUBLISH reaches
no one, and it cancels the request).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import redis

from blitzscale.settings import Settings
from tasks.celery_app import GENERATE_TASK, make_celery
from tasks.keys import GENERATION_QUEUE, replica_key_pattern, stream_channel
from tasks.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_STARTED, Job, StreamEvent


class QueueUnavailable(RuntimeError):
    """Redis (the broker) cannot be reached."""


class EventStream:
    """Iterates one request's events; yields None on idle ticks (time for an SSE keep-alive)."""

    def __init__(self, pubsub: redis.client.PubSub, channel: str, settings: Settings):
        self._pubsub = pubsub
        self._channel = channel
        self._settings = settings
        self.closed = False

    def events(self, tick: float | None = None) -> Iterator[StreamEvent | None]:
        """Yield events until final or error. Deadlines: `queue_timeout` until a replica takes
        the job, then `replica_silence_timeout` between events, `request_timeout` overall."""
        s = self._settings
        tick = tick or s.keep_alive_interval
        started_at = time.monotonic()
        last_event = started_at
        picked_up = False
        while True:
            now = time.monotonic()
            silence = s.replica_silence_timeout if picked_up else s.queue_timeout
            if now - last_event > silence or now - started_at > s.request_timeout:
                reason = "replica stopped responding" if picked_up else "no replica took the request in time"
                yield StreamEvent(kind=EVENT_ERROR, error=reason, error_type="generation")
                return
            try:
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=tick)
            except (redis.ConnectionError, redis.TimeoutError):
                yield StreamEvent(kind=EVENT_ERROR, error="lost the connection to the queue", error_type="generation")
                return
            if message is None:
                yield None
                continue
            event = StreamEvent.decode(message["data"])
            last_event = time.monotonic()
            picked_up = True
            yield event
            if event.kind in (EVENT_FINAL, EVENT_ERROR):
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._pubsub.unsubscribe(self._channel)
        except redis.RedisError:
            pass
        finally:
            self._pubsub.close()


class GenerationClient:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
        )
        self.celery = make_celery(settings)

    def submit(self, job: Job) -> EventStream:
        """Subscribe to the job's channel, wait for the subscription, then enqueue."""
        channel = stream_channel(job.request_id)
        pubsub = self.redis.pubsub()
        try:
            pubsub.subscribe(channel)
            confirmation = pubsub.get_message(timeout=5)
            if not confirmation or confirmation.get("type") != "subscribe":
                raise QueueUnavailable("stream subscription was not confirmed")
            self.celery.send_task(
                GENERATE_TASK, args=[job.to_dict()], queue=GENERATION_QUEUE, task_id=job.request_id
            )
        except (redis.RedisError, OSError) as error:
            pubsub.close()
            raise QueueUnavailable(str(error)) from error
        except Exception:
            pubsub.close()
            raise
        return EventStream(pubsub, channel, self.settings)

    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def replicas(self) -> list[dict]:
        """The records of every replica whose heartbeat has not expired."""
        try:
            keys = list(self.redis.scan_iter(match=replica_key_pattern(), count=100))
            raw = self.redis.mget(keys) if keys else []
        except (redis.RedisError, OSError):
            return []
        return [json.loads(r) for r in raw if r]

    def queue_size(self) -> int:
        try:
            return int(self.redis.llen(GENERATION_QUEUE))
        except (redis.RedisError, OSError):
            return 0
