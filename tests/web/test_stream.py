"""Server-sent events on /generate_stream and `/` with stream=true, through real Redis."""
from __future__ import annotations

import json
import time

import pytest

from common.keys import stream_channel
from tests.web.fake_replica import FakeReplica, fail_after, register_replica, reply
from web.app import create_app


def events_of(response) -> list:
    """Each `data:` event parsed; keep-alive comments as the string ':'."""
    text = response.get_data(as_text=True)
    assert text.endswith("\n\n")
    chunks = text[:-2].split("\n\n")
    out = []
    for chunk in chunks:
        if chunk == ":":
            out.append(":")
        else:
            assert chunk.startswith("data: ") and "\n" not in chunk
            payload = chunk[len("data: "):]
            assert payload == json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False)
            out.append(json.loads(payload))
    return out


def test_stream_framing_and_last_event(client, redis_url):
    with FakeReplica(redis_url, reply([" Paris", ".", " It"])):
        response = client.post("/generate_stream", json={"inputs": "the capital of france is",
                                                          "parameters": {"details": True}})
        response.get_data()
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = [e for e in events_of(response) if e != ":"]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert [e["token"]["text"] for e in events] == [" Paris", ".", " It"]
    for event in events[:-1]:
        assert list(event) == ["index", "token", "generated_text", "details"]
        assert event["generated_text"] is None and event["details"] is None
    last = events[-1]
    assert last["generated_text"] == " Paris. It"
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": None, "input_length": 5}


def test_stream_without_details_and_with_top_tokens(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b"])):
        response = client.post("/generate_stream", json={"inputs": "hello", "parameters": {"top_n_tokens": 3}})
        response.get_data()
    events = [e for e in events_of(response) if e != ":"]
    assert all(len(e["top_tokens"]) == 3 for e in events)
    assert events[-1]["details"] is None and events[-1]["generated_text"] == " a b"


@pytest.mark.parametrize("route", ["/", "/invocations"])
def test_compat_stream_prepends_the_prompt(client, redis_url, route):
    with FakeReplica(redis_url, reply([" world"])):
        response = client.post(route, json={"inputs": "hello", "stream": True})
        response.get_data()
    assert response.mimetype == "text/event-stream"
    events = [e for e in events_of(response) if e != ":"]
    assert events[-1]["generated_text"] == "hello world"


def test_keep_alive_while_idle(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b"], delay=0.35)):
        response = client.post("/generate_stream", json={"inputs": "hello"})
        response.get_data()
    events = events_of(response)
    assert ":" in events
    assert [e["index"] for e in events if e != ":"] == [1, 2]


def test_error_during_stream(client, redis_url):
    with FakeReplica(redis_url, fail_after([" a", " b"], "replica crashed")):
        response = client.post("/generate_stream", json={"inputs": "hello"})
        response.get_data()
    assert response.status_code == 200
    events = [e for e in events_of(response) if e != ":"]
    assert [e["index"] for e in events[:-1]] == [1, 2]
    assert events[-1] == {"error": "Request failed during generation: replica crashed", "error_type": "generation"}


def test_silent_replica_ends_the_stream_with_an_error(settings, redis_url):
    register_replica(redis_url)  # registered, but consuming nothing
    client = create_app(settings.replace(queue_timeout=0.3)).test_client()
    response = client.post("/generate_stream", json={"inputs": "hello"})
    events = [e for e in events_of(response) if e != ":"]
    assert events == [{"error": "Request failed during generation: no replica took the request in time",
                       "error_type": "generation"}]


def test_validation_error_is_json_before_the_stream(client):
    response = client.post("/generate_stream", json={"inputs": "hello", "parameters": {"top_k": 0}})
    assert response.status_code == 422 and response.mimetype == "application/json"


def test_client_disconnect_closes_the_stream_and_frees_the_slot(app, redis_url, redis_client):
    with FakeReplica(redis_url, reply([" a", " b", " c"], delay=0.2)) as replica:
        response = app.test_client().post("/generate_stream", json={"inputs": "hello"}, buffered=False)
        channel = stream_channel(replica.jobs[0].request_id) if replica.jobs else None
        assert app.extensions["blitzscale"].admission.in_flight == 1
        first = next(iter(response.response))
        assert first in (b":\n\n", ":\n\n") or b"data: " in first
        response.close()
    assert app.extensions["blitzscale"].admission.in_flight == 0
    deadline = time.monotonic() + 2
    channel = channel or stream_channel(replica.jobs[0].request_id)
    while redis_client.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert redis_client.pubsub_numsub(channel)[0][1] == 0


def test_unread_stream_is_closed_too(app, redis_url):
    with FakeReplica(redis_url, reply([" a"])):
        response = app.test_client().post("/generate_stream", json={"inputs": "hello"}, buffered=False)
        response.close()
    assert app.extensions["blitzscale"].admission.in_flight == 0
