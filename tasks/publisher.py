"""The replica's side of a request's stream channel (the web's side is tasks.client)."""
from __future__ import annotations

import redis

from tasks.keys import stream_channel
from tasks.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_STARTED, EVENT_TOKEN, StreamEvent


class StreamPublisher:
    def __init__(self, connection: redis.Redis, request_id: str):
        self._redis = connection
        self._channel = stream_channel(request_id)

    def publish(self, event: StreamEvent) -> bool:
        """Send one event; False when nobody listens any more (the client went away)."""
        return self._redis.publish(self._channel, event.encode()) > 0

    def started(self, replica: str, queue_time: float) -> bool:
        return self.publish(StreamEvent(kind=EVENT_STARTED, replica=replica, timings={"queue": queue_time}))

    def token(self, index: int, token: dict, top_tokens: list[dict] | None) -> bool:
        return self.publish(StreamEvent(kind=EVENT_TOKEN, index=index, token=token, top_tokens=top_tokens or None))

    def final(self, index: int, generated_text: str, details: dict, timings: dict) -> bool:
        return self.publish(
            StreamEvent(kind=EVENT_FINAL, index=index, generated_text=generated_text, details=details, timings=timings)
        )

    def error(self, message: str, error_type: str = "generation") -> bool:
        return self.publish(StreamEvent(kind=EVENT_ERROR, error=message, error_type=error_type))
