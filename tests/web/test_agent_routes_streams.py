"""/v1/messages and /v1/responses through real Redis and a scripted replica: a failure after the
stream began ends it in the route's own shape (never a hang), a keep-alive passes, both count in
the TGI metrics, and Anthropic's stop sequence split across tokens is cut and named."""
from __future__ import annotations

import hashlib
import json

import pytest
import redis

from common.protocol import FailureReason
from tests.web.fake_replica import FakeReplica, fail_after, reply
from tests.web.test_openai_routes import chat_model_dir, client  # noqa: F401  (fixtures)
from web.errors import GenerationError
from web.openai.responses_store import ResponseStore

ASK = [{"role": "user", "content": "hello world"}]


def events(response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event; (None, comment) for a keep-alive."""
    out = []
    for frame in response.get_data(as_text=True).split("\n\n"):
        if not frame:
            continue
        name = next((line[len("event: "):] for line in frame.split("\n") if line.startswith("event: ")), None)
        data = next((line[len("data: "):] for line in frame.split("\n") if line.startswith("data: ")), frame)
        out.append((name, data))
    return out


def test_messages_stream_failure_is_an_error_event(client, redis_url):  # noqa: F811
    with FakeReplica(redis_url, fail_after([" a"], "boom")):
        got = events(client.post("/v1/messages", json={"max_tokens": 5, "messages": ASK, "stream": True}))
    names = [name for name, _ in got]
    assert names[0] == "message_start" and names[-1] == "error" and "message_stop" not in names
    error = json.loads(got[-1][1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error" and "boom" in error["error"]["message"]
    assert any('"text":" a"' in data for name, data in got if name == "content_block_delta")


def test_responses_stream_failure_is_response_failed(client, redis_url):  # noqa: F811
    with FakeReplica(redis_url, fail_after([" a"], "boom")):
        got = events(client.post("/v1/responses", json={"input": "hello world", "stream": True,
                                                        "max_output_tokens": 5}))
    assert [name for name, _ in got][:2] == ["response.created", "response.in_progress"]
    last = json.loads(got[-1][1])
    assert got[-1][0] == "response.failed" and last["response"]["status"] == "failed"
    assert "boom" in last["response"]["error"]["message"]
    assert [json.loads(d)["sequence_number"] for n, d in got if n] == list(range(len(got)))


def test_keep_alives_pass_as_ping_and_comment(client, redis_url):  # noqa: F811
    with FakeReplica(redis_url, reply([" a", " b"], delay=0.5)):
        messages = events(client.post("/v1/messages", json={"max_tokens": 5, "messages": ASK, "stream": True}))
        responses = events(client.post("/v1/responses", json={"input": "hello world", "stream": True}))
    assert ("ping", '{"type":"ping"}') in messages and messages[-1][0] == "message_stop"
    assert any(name is None for name, _ in responses) and responses[-1][0] == "response.incomplete"


def test_stop_sequence_across_tokens_is_cut_and_named(client, redis_url):  # noqa: F811
    body = {"max_tokens": 5, "messages": ASK, "stop_sequences": ["zz", " bc"]}
    with FakeReplica(redis_url, reply([" a", " b", "c", " d"], finish_reason="stop_sequence")):
        whole = client.post("/v1/messages", json=body).get_json()
        streamed = events(client.post("/v1/messages", json={**body, "stream": True}))
    assert whole["content"] == [{"type": "text", "text": " a"}]
    assert whole["stop_reason"] == "stop_sequence" and whole["stop_sequence"] == " bc"
    text = "".join(json.loads(d)["delta"]["text"] for n, d in streamed if n == "content_block_delta")
    delta = json.loads(next(d for n, d in streamed if n == "message_delta"))["delta"]
    assert text == " a" and delta == {"stop_reason": "stop_sequence", "stop_sequence": " bc"}


def test_both_routes_count_in_tgi_metrics(client, redis_url):  # noqa: F811
    with FakeReplica(redis_url, reply([" a"])):
        assert client.post("/v1/messages", json={"max_tokens": 5, "messages": ASK}).status_code == 200
        assert client.post("/v1/responses", json={"input": "hello world"}).status_code == 200
    refused = client.post("/v1/messages", json={"max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert refused.status_code == 400 and refused.get_json()["error"]["type"] == "invalid_request_error"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tgi_request_count_total 3.0" in metrics and "tgi_request_success_total 2.0" in metrics
    assert 'tgi_request_failure_total{err="validation",reason="validation"} 1.0' in metrics


def test_a_stored_response_is_visible_to_another_web_process_and_never_kept_in_memory(client, redis_url):  # noqa: F811
    """Stored answers live in Redis only: any web process reads what another stored (through its
    own connection), and a client without Redis has no store (the queue's 503), never a
    process-local one."""
    with FakeReplica(redis_url, reply(["Hi", "!"])):
        answer = client.post("/v1/responses", json={"input": "hello world"}).get_json()
    no_token = hashlib.sha256(b"").hexdigest()  # the owner of requests made without a key
    stored = ResponseStore(redis.Redis.from_url(redis_url)).get(no_token, answer["id"])
    assert stored["response"]["id"] == answer["id"]
    with pytest.raises(GenerationError) as failure:
        ResponseStore(None).put("owner", {"id": "resp_x"}, [])
    assert failure.value.reason == FailureReason.QUEUE_UNAVAILABLE
