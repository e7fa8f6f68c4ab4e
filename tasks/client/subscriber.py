"""One Redis pub/sub connection per web process, shared by every request waiting for events.

A dispatcher thread owns the connection: it alone talks to Redis on it (subscribing,
unsubscribing, reading), and hands each message to its channel's `Subscription`, a queue that
the request's thread reads. So the connections of a web process stay fixed however many
requests, prompts or choices wait (vLLM's one output handler feeding a collector per request),
and no request thread ever blocks another on Redis.

- `subscribe` returns once Redis confirmed the subscription, so the job can be sent without
  missing an event; `Subscription.close` unsubscribes, so the replica's next PUBLISH reaches
  no one and it cancels the request (tasks/runtime/stream_relay.py).
- A lost connection (Redis restarted, network cut) is an outage, not a failure: the dispatcher
  reconnects with backoff and subscribes every live channel again; the waiting requests keep
  waiting within their own deadlines (docs/failure-policy.md). `healthy_since` says since when
  the connection is up again (None while it is down, -inf if it never went). A connection that
  went silent (cut without a FIN or RST) is lost too: a PING it does not answer says so.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time

import redis

log = logging.getLogger(__name__)

TICK = 0.05  # seconds between looks at the command queue while no message comes
MAX_BACKOFF = 2.0  # seconds between reconnection tries during an outage
# A connection cut without a FIN or RST (a Redis host gone, a failover that moved its address)
# never fails a read, and TCP keepalive notices it after hours: after QUIET seconds with nothing
# heard the dispatcher PINGs, and a PING unanswered for PONG_TIMEOUT seconds is a lost connection
# (the command connections' socket_timeout: a Redis that stalls less long is not given up on).
QUIET = 1.0
PONG_TIMEOUT = 10.0


class SubscribeFailed(RuntimeError):
    """Redis did not confirm a subscription in time."""


class Subscription:
    """One channel's messages, in order, for the one request thread that reads them."""

    def __init__(self, subscriber: "Subscriber", channel: str):
        self.channel = channel
        self._subscriber = subscriber
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        self.confirmed = threading.Event()
        self.closed = False
        # Set when the connection came back: events published while it was away reached nobody
        # (a final dropped, a request its replica cancelled), which only silence will show.
        self.interrupted = False

    def get(self, timeout: float) -> bytes | None:
        """The next message's data, or None when none came within `timeout` seconds."""
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._subscriber.unsubscribe(self)


class Subscriber:
    def __init__(self, redis_url: str, client_name: str | None = None):
        # Its own connection, not one from the web's pool: it is held for the process's life.
        self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_keepalive=True,
                                           client_name=client_name)
        self._pubsub = self._redis.pubsub()
        self._channels: dict[str, Subscription] = {}  # dispatcher thread only
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # ("subscribe" | "unsubscribe", Subscription)
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.healthy_since: float | None = -math.inf  # monotonic time it came back; never lost: -inf
        self._heard_at = time.monotonic()  # dispatcher thread only: when Redis last sent anything
        self._pinged_at: float | None = None  # when a PING still unanswered was sent

    def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """Subscribed and confirmed by Redis; raises SubscribeFailed after `timeout` seconds."""
        subscription = Subscription(self, channel)
        self._start()
        self._commands.put(("subscribe", subscription))
        if not subscription.confirmed.wait(timeout):
            subscription.close()
            raise SubscribeFailed(f"the subscription to the request's channel was not confirmed in {timeout:g} s")
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._commands.put(("unsubscribe", subscription))

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def _start(self) -> None:
        """On first use, in the process that serves (after gunicorn forks)."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="redis-subscriber", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        backoff = TICK
        while True:
            try:
                self._apply_commands()
                self._read()
                if self.healthy_since is None:
                    self._recovered()
                backoff = TICK
            except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
                self._lost(error)
                time.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                self._reconnect()
            except Exception:  # a bug must not end the thread: every waiting request would hang
                log.exception("redis subscriber: unexpected error")
                time.sleep(TICK)

    def _apply_commands(self) -> None:
        subscribe, unsubscribe = [], []
        while True:
            try:
                command, subscription = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "subscribe":
                self._channels[subscription.channel] = subscription
                subscribe.append(subscription.channel)
            elif self._channels.get(subscription.channel) is subscription:
                del self._channels[subscription.channel]
                unsubscribe.append(subscription.channel)
        if unsubscribe:
            self._pubsub.unsubscribe(*unsubscribe)
        if subscribe:
            self._pubsub.subscribe(*subscribe)

    def _read(self) -> None:
        """Hand over the next message (waiting up to a tick for one)."""
        if not self._pubsub.subscribed:
            self._heard_at, self._pinged_at = time.monotonic(), None  # nothing to hear while idle
            time.sleep(TICK)
            return
        message = self._pubsub.get_message(timeout=TICK)
        now = time.monotonic()
        if message is not None:
            self._heard_at, self._pinged_at = now, None
            self._dispatch(message)
        elif self._pinged_at is not None and now - self._pinged_at > PONG_TIMEOUT:
            raise redis.TimeoutError(f"no answer to a PING in {PONG_TIMEOUT:g} s")
        elif self._pinged_at is None and now - self._heard_at > QUIET:
            self._pubsub.ping()  # its pong is a message like any other
            self._pinged_at = now

    def _dispatch(self, message: dict) -> None:
        channel = _text(message.get("channel"))
        subscription = self._channels.get(channel)
        if message["type"] == "subscribe":
            if subscription is not None:
                subscription.confirmed.set()
            else:  # closed before its confirmation came (or resubscribed after an outage): let it go
                self._pubsub.unsubscribe(channel)
        elif message["type"] == "message":
            if subscription is not None:
                subscription._messages.put(message["data"])

    def _lost(self, error: Exception) -> None:
        if self.healthy_since is not None:
            log.warning("redis subscriber: lost the connection (%s); %d request(s) keep waiting while it "
                        "reconnects", error, len(self._channels))
        self.healthy_since = None

    def _reconnect(self) -> None:
        """Connect again, and subscribe every live channel: redis-py's own resubscription knows
        only those confirmed before the outage, not those asked for during it."""
        connection = self._pubsub.connection
        if connection is None:
            return
        self._heard_at, self._pinged_at = time.monotonic(), None
        try:
            connection.disconnect()
            connection.connect()
            if self._channels:
                self._pubsub.subscribe(*self._channels)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # still down: the next pass tries again

    def _recovered(self) -> None:
        self.healthy_since = time.monotonic()
        for subscription in self._channels.values():
            subscription.interrupted = True
        log.warning("redis subscriber: connected again; %d request(s) subscribed again", len(self._channels))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
