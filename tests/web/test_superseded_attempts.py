"""The replica's stream relay cancels a run whose request the web re-enqueued as a newer attempt
(one live attempt per request), on a real Redis: what the web writes (`attempt_key`) is what the
relay reads."""
from __future__ import annotations

import time

import pytest
import redis

from common.keys import attempt_key
from engine.outputs import Token, TokenEvent
from tasks.runtime.stream_relay import StreamRelay


@pytest.fixture
def relay(redis_url):
    cancelled: list[str] = []
    relay = StreamRelay(redis.Redis.from_url(redis_url), cancel=cancelled.append, alive_interval=600)  # no `alive` tick: nobody listens here
    relay.cancelled = cancelled
    yield relay
    relay.stop()


def step(relay: StreamRelay, *engine_ids: str) -> None:
    relay.on_step([TokenEvent(request_id=i, index=1, token=Token(id=1, text="t", logprob=-0.5)) for i in engine_ids])


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_run_of_an_older_attempt_is_cancelled_at_the_next_step(relay, redis_client):
    relay.register("old", "req-1", attempt=0, stream=False)
    relay.register("req-1.1", "req-1", attempt=1, stream=False)  # the newer run, on this same replica
    redis_client.set(attempt_key("req-1"), 1)
    step(relay, "old", "req-1.1")
    assert wait_for(lambda: relay.cancelled == ["old"])
    step(relay, "req-1.1")
    relay.stop()  # every pass done: nothing else was cancelled
    assert relay.cancelled == ["old"]


def test_runs_of_the_current_attempt_go_on(relay, redis_client):
    relay.register("req-3.2", "req-3", attempt=2, stream=False)
    redis_client.set(attempt_key("req-3"), 2)
    for _ in range(3):
        step(relay, "req-3.2")
    relay.stop()
    assert relay.cancelled == []
