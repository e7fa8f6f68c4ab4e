"""The stream relay's edge cases, with a client double whose streams replay given events."""
from __future__ import annotations

import json

from common.protocol import EVENT_FINAL, StreamEvent
from common.settings import Settings
from tests.web.fake_replica import token
from web.app import create_app


class ReplayStream:
    def __init__(self, events):
        self._events = events
        self.closed = False

    def events(self, tick=None):
        yield from self._events

    def close(self):
        self.closed = True


class ReplayClient:
    """GenerationClient's interface; every submitted job gets the same events."""

    def __init__(self, events):
        self._events = events
        self.streams = []

    def submit(self, job):
        self.streams.append(ReplayStream(self._events))
        return self.streams[-1]

    def redis_alive(self):
        return True

    def replicas(self):
        return [{"slot": 0, "state": "active", "device_type": "cpu"}]

    def queue_size(self):
        return 0


def stream(model_dir, events, **parameters):
    client = ReplayClient(events)
    app = create_app(Settings(model_id=str(model_dir), redis_url="redis://unused"), client)
    response = app.test_client().post("/generate_stream", json={"inputs": "hello", "parameters": parameters})
    chunks = response.get_data(as_text=True).split("\n\n")[:-1]
    assert all(s.closed for s in client.streams)
    return [json.loads(c[len("data: "):]) for c in chunks if c.startswith("data: ")]


def final(n, **details):
    return StreamEvent(kind=EVENT_FINAL, index=n, generated_text="x" * n, details=details or None)


def test_duplicate_token_events_are_dropped(model_dir):
    events = stream(model_dir, [token(1, "a"), token(1, "a"), token(2, "b"), final(2)])
    assert [e["index"] for e in events] == [1, 2] and events[-1]["generated_text"] == "xx"


def test_final_without_token_events_uses_the_last_detail_token(model_dir):
    tok = {"id": 5, "text": "z", "logprob": -1.0, "special": False}
    events = stream(model_dir, [final(1, tokens=[tok], finish_reason="eos_token", generated_tokens=1)], details=True)
    assert events == [{"index": 1, "token": tok, "generated_text": "x",
                       "details": {"finish_reason": "eos_token", "generated_tokens": 1, "seed": None,
                                   "input_length": 1}}]


def test_stream_that_ends_without_final_is_incomplete(model_dir):
    events = stream(model_dir, [token(1, "a"), None])
    assert events[0]["index"] == 1
    assert events[-1] == {"error": "Incomplete generation", "error_type": "incomplete_generation"}


def test_non_streaming_without_final_is_500(model_dir):
    app = create_app(Settings(model_id=str(model_dir), redis_url="redis://unused"), ReplayClient([token(1, "a")]))
    response = app.test_client().post("/generate", json={"inputs": "hello"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "Incomplete generation", "error_type": "incomplete_generation"}


def test_unreadable_event_ends_the_stream_with_an_error(model_dir):
    class Broken(ReplayStream):
        def events(self, tick=None):
            yield token(1, "a")
            raise ValueError("bad message")

    client = ReplayClient([])
    client.submit = lambda job: Broken([])
    app = create_app(Settings(model_id=str(model_dir), redis_url="redis://unused"), client)
    body = app.test_client().post("/generate_stream", json={"inputs": "hello"}).get_data(as_text=True)
    assert body.endswith('data: {"error":"Request failed during generation: bad message","error_type":"generation"}\n\n')
    assert '"index":1' in body
