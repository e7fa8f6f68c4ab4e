"""The replica's stream relay (tasks/runtime/stream_relay.py) on a real Redis: retries, final events
that wait out an outage, the error event of a stream that lost tokens, `alive` ticks, and a bug
that must not end it.
PUBLISH is taken away from the relay's own ACL user, so the failure is Redis's own NOPERM."""
from __future__ import annotations

import logging
import time

import pytest
import redis

from common.keys import stream_channel
from common.protocol import EVENT_ALIVE, EVENT_ERROR, EVENT_FINAL, EVENT_TOKEN, StreamEvent
from engine.outputs import Token, TokenEvent
from tasks.runtime.stream_relay import PUBLISH_FAILED, StreamRelay


@pytest.fixture
def admin(redis_url):
    connection = redis.Redis.from_url(redis_url)
    connection.execute_command("ACL", "SETUSER", "relay", "on", ">pw", "~*", "&*", "+@all")
    yield connection
    connection.execute_command("ACL", "SETUSER", "relay", "+publish")


@pytest.fixture
def relay_user(redis_url, admin):
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    return redis.Redis(host="127.0.0.1", port=port, username="relay", password="pw", socket_timeout=2)


class Listener:
    def __init__(self, redis_url: str, channel_id: str):
        self.pubsub = redis.Redis.from_url(redis_url).pubsub()
        self.pubsub.subscribe(stream_channel(channel_id))
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"

    def next(self, timeout: float = 10.0, skip_alive: bool = True) -> StreamEvent | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                event = StreamEvent.decode(message["data"])
                if not (skip_alive and event.kind == EVENT_ALIVE):
                    return event
        return None


def token_event(request_id: str, index: int) -> TokenEvent:
    return TokenEvent(request_id=request_id, index=index, token=Token(id=index, text=f"t{index}", logprob=-0.5))


@pytest.fixture
def make_relay():
    relays: list[StreamRelay] = []

    def make(connection, cancelled: list, **kwargs) -> StreamRelay:
        relays.append(StreamRelay(connection, cancel=cancelled.append, **{"retries": 2, "backoff": 0.01, **kwargs}))
        return relays[-1]

    yield make
    for relay in relays:
        relay.stop()


def test_a_short_outage_is_retried_and_loses_nothing(redis_url, admin, relay_user, make_relay):
    cancelled: list = []
    relay = make_relay(relay_user, cancelled, retries=6, backoff=0.05)
    listener = Listener(redis_url, "short")
    relay.register("short")
    admin.execute_command("ACL", "SETUSER", "relay", "-publish")
    relay.on_step([token_event("short", 1)])
    time.sleep(0.2)  # within the retries (~3 s in all)
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    relay.send("short", StreamEvent(kind=EVENT_FINAL, index=1, generated_text="t1"))
    assert [e.kind for e in (listener.next(), listener.next())] == [EVENT_TOKEN, EVENT_FINAL]
    assert cancelled == []


def test_tokens_that_cannot_be_published_fail_the_request_with_an_error_event(redis_url, admin, relay_user, make_relay):
    cancelled: list = []
    relay = make_relay(relay_user, cancelled)
    listener = Listener(redis_url, "lost")
    relay.register("lost", attempt=2)
    admin.execute_command("ACL", "SETUSER", "relay", "-publish")
    relay.on_step([token_event("lost", 1)])
    deadline = time.monotonic() + 10
    while not cancelled:
        assert time.monotonic() < deadline, "the request was never failed"
        time.sleep(0.02)
    assert cancelled == ["lost"]  # the engine stops generating what nobody can receive
    relay.send("lost", StreamEvent(kind=EVENT_FINAL, index=1, attempt=2))  # finished meanwhile
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    event = listener.next()
    assert (event.kind, event.error, event.error_type, event.attempt) == (
        EVENT_ERROR, PUBLISH_FAILED, "incomplete_generation", 2)
    assert listener.next(timeout=1.5) is None  # its final never follows: the request failed


def test_a_final_event_waits_out_an_outage_and_goes_out_unchanged(redis_url, admin, relay_user, make_relay):
    cancelled: list = []
    relay = make_relay(relay_user, cancelled)
    listener = Listener(redis_url, "final")
    relay.register("final", stream=False)
    admin.execute_command("ACL", "SETUSER", "relay", "-publish")
    relay.send("final", StreamEvent(kind=EVENT_FINAL, index=3, generated_text="abc"))
    time.sleep(0.5)  # past the retries (~0.03 s)
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    event = listener.next()
    assert (event.kind, event.generated_text, event.index) == (EVENT_FINAL, "abc", 3)
    assert listener.next(timeout=1.0) is None  # one answer, no error after it
    assert cancelled == []  # its generation was done: nothing to cancel


def test_a_stream_that_lost_no_token_ends_with_its_final_after_an_outage(redis_url, admin, relay_user, make_relay):
    cancelled: list = []
    relay = make_relay(relay_user, cancelled)
    listener = Listener(redis_url, "whole")
    relay.register("whole")
    relay.on_step([token_event("whole", 1)])
    assert listener.next().kind == EVENT_TOKEN
    admin.execute_command("ACL", "SETUSER", "relay", "-publish")
    relay.send("whole", StreamEvent(kind=EVENT_FINAL, index=1, generated_text="t1"))
    time.sleep(0.5)
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    event = listener.next()
    assert (event.kind, event.generated_text) == (EVENT_FINAL, "t1")
    assert cancelled == []


def test_a_pending_final_keeps_the_web_hearing_alive_ticks(redis_url, admin, relay_user, make_relay):
    """Its generation is done, so its ticks do not stop with the engine (stall_after) but go on
    until the final goes out; they are sent before it in the pass that delivers it."""
    relay = make_relay(relay_user, [], alive_interval=0.1, stall_after=0.2)
    listener = Listener(redis_url, "waiting")
    relay.register("waiting", stream=False)
    admin.execute_command("ACL", "SETUSER", "relay", "-publish")
    relay.send("waiting", StreamEvent(kind=EVENT_FINAL, index=2, generated_text="ok"))
    time.sleep(0.6)  # past the retries, and past stall_after with no engine step
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    kinds = []
    while (event := listener.next(timeout=2.0, skip_alive=False)) is not None and event.kind != EVENT_FINAL:
        kinds.append(event.kind)
    assert event is not None and event.generated_text == "ok"
    assert kinds and set(kinds) == {EVENT_ALIVE}


def test_a_final_that_waits_past_give_up_after_is_dropped_with_a_log_line(redis_url, admin, relay_user, make_relay,
                                                                          caplog):
    relay = make_relay(relay_user, [], give_up_after=0.3)
    listener = Listener(redis_url, "late")
    relay.register("late", stream=False)
    with caplog.at_level(logging.ERROR, logger="tasks.runtime.stream_relay"):
        admin.execute_command("ACL", "SETUSER", "relay", "-publish")
        relay.send("late", StreamEvent(kind=EVENT_FINAL, index=1, generated_text="x"))
        deadline = time.monotonic() + 5
        while not any("gave up publishing the final event" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the pending final never expired"
            time.sleep(0.05)
    admin.execute_command("ACL", "SETUSER", "relay", "+publish")
    assert listener.next(timeout=1.0) is None  # the web's silence deadline has ended that request


def test_alive_ticks_while_the_engine_steps_and_none_when_it_stalls(redis_url, relay_user, make_relay):
    relay = make_relay(relay_user, [], alive_interval=0.1, stall_after=1.0)
    listener = Listener(redis_url, "quiet")
    relay.register("quiet", stream=False)
    relay.on_step([token_event("other", 1)])
    event = listener.next(timeout=5, skip_alive=False)
    assert event is not None and event.kind == EVENT_ALIVE
    time.sleep(1.5)  # no engine step for longer than stall_after
    while listener.next(timeout=0.3, skip_alive=False) is not None:
        pass  # ticks sent before the stall was seen
    assert listener.next(timeout=1.0, skip_alive=False) is None


def test_an_unexpected_error_is_logged_and_the_relay_goes_on(redis_url, relay_user, make_relay, caplog):
    cancelled: list = []
    relay = make_relay(relay_user, cancelled)
    broken, fine = Listener(redis_url, "broken"), Listener(redis_url, "fine")
    relay.register("broken")
    relay.register("fine")
    with caplog.at_level(logging.ERROR, logger="tasks.runtime.stream_relay"):
        relay.on_step([TokenEvent(request_id="broken", index=1, token=None)])  # an engine bug
        event = broken.next()
    assert (event.kind, event.error_type) == (EVENT_ERROR, "incomplete_generation")
    assert cancelled == ["broken"]
    assert any(r.exc_info for r in caplog.records), "logged without its traceback"
    relay.on_step([token_event("fine", 1)])
    relay.send("fine", StreamEvent(kind=EVENT_FINAL, index=1))
    assert [e.kind for e in (fine.next(), fine.next())] == [EVENT_TOKEN, EVENT_FINAL]
