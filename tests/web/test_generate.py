"""/generate and the compatible routes, end to end through real Redis and a scripted replica."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from common.keys import replica_key
from common.protocol import EVENT_FINAL
from tests.web.fake_replica import FakeReplica, fail_after, register_replica, reply
from web.app import create_app

TIMING_HEADERS = ["x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time", "x-validation-time",
                  "x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"]


def test_generate_returns_text_and_tgi_headers(client, redis_url):
    register_replica(redis_url, device_type="cuda")
    with FakeReplica(redis_url, reply([" Paris", "."])) as replica:
        response = client.post("/generate", json={"inputs": "the capital of france is",
                                                   "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"generated_text": " Paris."}
    h = response.headers
    assert all(name in h for name in TIMING_HEADERS)
    assert h["x-compute-type"] == "cuda"
    assert h["x-compute-characters"] == str(len("the capital of france is"))
    assert h["x-prompt-tokens"] == "5" and h["x-generated-tokens"] == "2"
    assert h["x-queue-time"] == "250" and h["x-inference-time"] == "500"  # TGI: milliseconds
    assert h["x-time-per-token"] == "250"
    assert float(h["x-total-time"]) >= float(h["x-validation-time"]) >= 0
    job = replica.jobs[0]
    assert job.input_ids == [3, 4, 5, 6, 7] and job.stopping.max_new_tokens == 2 and job.stream is False


def test_compute_type_is_cpu_without_a_replica_record(client, redis_url):
    with FakeReplica(redis_url, reply(["x"])):
        response = client.post("/generate", json={"inputs": "hello"})
    assert response.headers["x-compute-type"] == "cpu"


def test_compute_type_is_the_serving_replicas_not_the_first_ones(client, redis_url):
    register_replica(redis_url, slot=0, device_type="cpu")  # the first active replica
    register_replica(redis_url, slot=1, device_type="cuda")

    def served_on_cuda(job):
        for event in reply(["x"])(job):
            if event.kind == EVENT_FINAL:
                event.device_type = "cuda"  # what the replica that served it reports
            yield event

    try:
        with FakeReplica(redis_url, served_on_cuda):
            response = client.post("/generate", json={"inputs": "hello"})
    finally:
        redis.Redis.from_url(redis_url).delete(replica_key("replica1@test"))
    assert response.status_code == 200 and response.headers["x-compute-type"] == "cuda"


def test_details(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b"], finish_reason="eos_token")):
        body = client.post("/generate", json={"inputs": "hello", "parameters": {"details": True}}).get_json()
    details = body["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert details["finish_reason"] == "eos_token" and details["generated_tokens"] == 2
    assert details["seed"] is None and details["prefill"] == []
    assert [t["text"] for t in details["tokens"]] == [" a", " b"]


def test_decoder_input_details_top_tokens_and_seed(client, redis_url):
    parameters = {"decoder_input_details": True, "top_n_tokens": 2, "do_sample": True, "seed": 9}
    with FakeReplica(redis_url, reply([" a"])):
        body = client.post("/generate", json={"inputs": "hello world", "parameters": parameters}).get_json()
    details = body["details"]
    assert len(details["prefill"]) == 2 and details["prefill"][0]["logprob"] is None
    assert details["seed"] == 9 and len(details["top_tokens"]) == 1 and len(details["top_tokens"][0]) == 2


def test_return_full_text(client, redis_url):
    with FakeReplica(redis_url, reply([" world"])):
        body = client.post("/generate", json={"inputs": "hello", "parameters": {"return_full_text": True}}).get_json()
    assert body == {"generated_text": "hello world"}


@pytest.mark.parametrize("route", ["/", "/invocations"])
def test_compat_routes_return_a_list_with_the_full_text(client, redis_url, route):
    with FakeReplica(redis_url, reply([" world"])):
        response = client.post(route, json={"inputs": "hello", "stream": False})
    assert response.status_code == 200
    assert response.get_json() == [{"generated_text": "hello world"}]
    assert response.headers["x-generated-tokens"] == "1"


def test_error_event_is_424(client, redis_url):
    with FakeReplica(redis_url, fail_after([" a"], "out of memory")):
        response = client.post("/generate", json={"inputs": "hello"})
    assert response.status_code == 424
    assert response.get_json() == {"error": "Request failed during generation: out of memory",
                                   "error_type": "generation"}


def test_no_replica_gives_up_after_the_queue_timeout(settings, redis_url):
    register_replica(redis_url)  # registered, but consuming nothing
    client = create_app(settings.replace(queue_timeout=0.3)).test_client()
    response = client.post("/generate", json={"inputs": "hello"})
    assert response.status_code == 424
    assert response.get_json()["error"] == "Request failed during generation: no replica took the request in time"


def test_no_replica_at_all_fails_at_once(settings):
    client = create_app(settings.replace(queue_timeout=30)).test_client()
    started = time.monotonic()
    response = client.post("/generate", json={"inputs": "hello"})
    assert time.monotonic() - started < 2
    assert response.status_code == 424
    assert response.get_json() == {"error": "Request failed during generation: no replica is available to serve "
                                   "the request", "error_type": "generation"}


def test_overloaded_when_the_concurrency_limit_is_reached(settings, redis_url):
    app = create_app(settings.replace(max_concurrent_requests=1))
    client = app.test_client()
    release = threading.Event()

    def slow(job):
        release.wait(5)
        yield from reply([" a"])(job)

    results = []
    with FakeReplica(redis_url, slow) as replica:
        worker = threading.Thread(target=lambda: results.append(client.post("/generate", json={"inputs": "hello"})))
        worker.start()
        while not replica.jobs:
            threading.Event().wait(0.01)
        response = app.test_client().post("/generate", json={"inputs": "hello"})
        assert response.status_code == 429
        assert response.get_json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        release.set()
        worker.join(5)
    assert results[0].status_code == 200
    assert app.extensions["blitzscale"].admission.in_flight == 0


def test_unsubscribes_when_done(client, redis_url, redis_client):
    with FakeReplica(redis_url, reply([" a"])) as replica:
        client.post("/generate", json={"inputs": "hello"})
    from common.keys import stream_channel

    assert redis_client.pubsub_numsub(stream_channel(replica.jobs[0].request_id))[0][1] == 0


def test_a_broker_that_refuses_the_job_is_the_queue_unavailable_error(settings, redis_url, redis_client):
    """kombu's OperationalError from send_task (the broker unreachable) is a clear 424, counted
    under queue_unavailable, and the request's subscription is let go."""
    app = create_app(settings)
    client = app.extensions["blitzscale"].client
    client.celery.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there
    client.celery.conf.broker_connection_max_retries = 0
    client.celery.conf.task_publish_retry = False
    register_replica(redis_url)
    response = app.test_client().post("/generate", json={"inputs": "hello"})
    assert response.status_code == 424, response.get_json()
    assert response.get_json()["error"].startswith("Request failed during generation: the queue is unavailable")
    deadline = time.monotonic() + 5
    while client.subscriber.channel_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.subscriber.channel_count == 0
