"""A stream whose replica's token events reached nobody for a moment (the relay, right after a
Redis outage, does not count a PUBLISH that reaches nobody as the client gone, and goes on) has a
gap: the next token the web hears is not the next index. The client must not get text with
tokens missing from its middle as if nothing happened: the stream ends with an error event."""
from __future__ import annotations

from common.protocol import EVENT_FINAL, EVENT_STARTED, StreamEvent
from tests.web.fake_replica import FakeReplica, register_replica, token


def with_a_gap(job):
    yield StreamEvent(kind=EVENT_STARTED, replica="replica0@test")
    yield token(1, " a")
    yield token(3, " c")  # token 2 reached nobody
    yield StreamEvent(kind=EVENT_FINAL, index=3, generated_text=" a b c",
                      details={"finish_reason": "length", "generated_tokens": 3})


def test_a_token_gap_ends_a_tgi_stream_with_an_error(client, redis_url):
    register_replica(redis_url)
    with FakeReplica(redis_url, with_a_gap):
        body = client.post("/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}
                           ).get_data(as_text=True)
    assert '" c"' not in body and '" a b c"' not in body, body
    last = body.strip().split("\n\n")[-1]
    assert last.startswith('data: {"error":') and "the stream lost tokens" in last, body


def test_a_token_gap_ends_an_openai_stream_with_an_error(client, redis_url):
    register_replica(redis_url)
    with FakeReplica(redis_url, with_a_gap):
        body = client.post("/v1/completions", json={"model": "tgi", "prompt": "hello", "max_tokens": 3,
                                                    "stream": True}).get_data(as_text=True)
    assert '" c"' not in body, body
    frames = body.strip().split("\n\n")
    assert any('"error"' in f and "the stream lost tokens" in f for f in frames[-2:]), body
