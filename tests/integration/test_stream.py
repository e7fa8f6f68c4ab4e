"""SSE streaming through the real server: framing, content, errors, disconnects."""
from __future__ import annotations

import json
import time

import requests

from tests.integration.sse import sse_events


def stream(service, path="/generate_stream", **body):
    return requests.post(f"{service.base_url}{path}", json=body, stream=True, timeout=60)


def test_stream_framing_and_content(service):
    response = stream(service, inputs="Hello", parameters={"max_new_tokens": 8, "details": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    events = sse_events(response)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
    last = events[-1]
    texts = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert last["generated_text"] == texts
    assert last["details"]["finish_reason"] in ("length", "eos_token")
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] > 0
    assert "seed" in last["details"]


def test_stream_equals_non_stream(service):
    params = {"max_new_tokens": 10, "details": True}
    events = sse_events(stream(service, inputs="The capital of France is", parameters=params))
    body = requests.post(f"{service.base_url}/generate", json={"inputs": "The capital of France is", "parameters": params}).json()
    assert [e["token"]["id"] for e in events] == [t["id"] for t in body["details"]["tokens"]]
    assert events[-1]["generated_text"] == body["generated_text"]


def test_stream_without_details_has_null_details(service):
    events = sse_events(stream(service, inputs="Hello", parameters={"max_new_tokens": 3}))
    assert events[-1]["details"] is None
    assert events[-1]["generated_text"] is not None


def test_stream_top_tokens_and_full_text(service):
    events = sse_events(stream(service, inputs="Hello", parameters={"max_new_tokens": 3, "top_n_tokens": 2,
                                                                     "return_full_text": True}))
    assert all(len(e["top_tokens"]) == 2 for e in events)
    assert events[-1]["generated_text"].startswith("Hello")


def test_each_event_is_one_compact_data_line(service):
    response = stream(service, inputs="Hello", parameters={"max_new_tokens": 3})
    raw = response.content.decode()
    blocks = [b for b in raw.split("\n\n") if b]
    for block in blocks:
        if block.startswith(":"):
            continue  # keep-alive comment
        assert block.startswith("data:") and "\n" not in block
        json.loads(block[len("data:"):])


def test_validation_error_on_stream_is_a_json_422(service):
    response = stream(service, inputs="Hello", parameters={"max_new_tokens": 3, "best_of": 2, "do_sample": True})
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `best_of` != 1 is not supported when streaming tokens",
        "error_type": "validation",
    }


def test_client_disconnect_cancels_the_generation(service):
    """A client that goes away mid-stream frees its replica slot within a step or so."""
    import redis as redis_lib

    from common.keys import replica_key

    response = stream(service, inputs="Hello", parameters={"max_new_tokens": 900})
    lines = response.iter_lines()
    for line in lines:
        if line.startswith(b"data:"):
            break
    connection = redis_lib.Redis.from_url(service.redis.url)

    def running():
        keys = list(connection.scan_iter(match=replica_key("*")))
        records = [json.loads(r) for r in connection.mget(keys) if r] if keys else []
        return sum(r["running"] for r in records) if records else None

    response.close()
    deadline = time.monotonic() + 10
    while running() != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0
