"""Faults caused for real: replica processes SIGKILLed mid-generation, Redis restarted under load.
Each test drives its own service (Redis, replica workers, gunicorn) with short deadlines."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from blitzscale.redis_server import EmbeddedRedis
from common.keys import replica_key
from tests.integration.sse import sse_events
from tests.service import Service

FAST = {
    "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "2048",
    "HEARTBEAT_INTERVAL": "0.3", "HEARTBEAT_TTL": "1.5", "REPLICA_CHECK_INTERVAL": "0.3",
    "QUEUE_TIMEOUT": "20", "REPLICA_SILENCE_TIMEOUT": "15", "REQUEST_TIMEOUT": "120", "KEEP_ALIVE_INTERVAL": "1",
}
LONG = {"max_new_tokens": 800}  # seconds on the tiny model: long enough to be killed in


def fault_service(tiny_model_dir, tmp_path_factory, name: str, replicas: int) -> Service:
    workdir = tmp_path_factory.mktemp(name)
    return Service(str(tiny_model_dir), workdir, env={**FAST, "XDG_CACHE_HOME": str(workdir / "cache")},
                   replicas=replicas)


@pytest.fixture(scope="module")
def two_replicas(tiny_model_dir, tmp_path_factory):
    with fault_service(tiny_model_dir, tmp_path_factory, "faults", replicas=2).running(active_replicas=2) as svc:
        yield svc


def records(svc: Service) -> dict[str, dict]:
    connection = redis.Redis.from_url(svc.redis.url)
    keys = list(connection.scan_iter(match=replica_key("*")))
    return {r["name"]: r for r in (json.loads(v) for v in connection.mget(keys) if v)} if keys else {}


def busiest_slot(svc: Service, timeout: float = 20) -> int:
    """The slot of a replica that is generating now (waits until one is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [r for r in records(svc).values() if r.get("running")]
        if busy:
            return max(busy, key=lambda r: r["running"])["slot"]
        time.sleep(0.05)
    raise AssertionError("no replica became busy")


def generate(svc: Service, inputs: str, timeout: float = 90, **parameters) -> requests.Response:
    return requests.post(f"{svc.base_url}/generate", json={"inputs": inputs, "parameters": parameters},
                         timeout=timeout)


def test_non_streaming_requests_survive_a_replica_sigkill(two_replicas):
    svc = two_replicas
    prompts = [f"Once upon a time {n}" for n in range(4)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(generate, svc, p, details=True, **LONG) for p in prompts]
        victim = busiest_slot(svc)
        svc.kill_replica(victim)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses]
    assert "re-enqueued as attempt 1" in web_log(svc)  # it was mid-generation
    metrics = requests.get(f"{svc.base_url}/metrics", timeout=10).text
    assert re.search(r"^blitz_request_redeliveries_total [1-9]", metrics, re.M), "failover not counted"
    # Greedy: the re-run regenerated exactly what an undisturbed run gives.
    for prompt, response in zip(prompts[:1], responses):
        again = generate(svc, prompt, details=True, **LONG).json()
        assert response.json()["generated_text"] == again["generated_text"]
    svc.start_replica(victim)
    svc.wait_for_replicas(2)


def test_a_stream_continues_or_ends_with_one_clear_error(two_replicas):
    svc = two_replicas
    prompt, parameters = "Hello, world! This is", {"max_new_tokens": 2000}
    reference = generate(svc, prompt, details=True, **parameters).json()
    time.sleep(1)  # the replicas' records no longer show the reference as running
    retries = web_log(svc).count("re-enqueued")
    response = requests.post(f"{svc.base_url}/generate_stream", json={"inputs": prompt, "parameters": parameters},
                             stream=True, timeout=90)
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))
    victim = busiest_slot(svc)
    svc.kill_replica(victim)
    started = time.monotonic()
    events = [json.loads(first[5:])] + sse_events_of(lines)
    assert time.monotonic() - started < 60
    tokens = [e for e in events if "token" in e]
    assert [e["index"] for e in tokens] == list(range(1, len(tokens) + 1))  # no gap, no duplicate
    assert web_log(svc).count("re-enqueued") == retries + 1  # it was mid-generation
    if "error" in events[-1]:
        assert sum("error" in e for e in events) == 1 and events[-1]["error_type"] == "generation"
    else:  # seamless: the text is what an undisturbed run gives
        assert events[-1]["generated_text"] == reference["generated_text"]
        assert [e["token"]["id"] for e in tokens] == [t["id"] for t in reference["details"]["tokens"]]
    print("stream after the kill:", "error" if "error" in events[-1] else "continued seamlessly", len(tokens))
    svc.start_replica(victim)
    svc.wait_for_replicas(2)


def web_log(svc: Service) -> str:
    return (svc.workdir / "web.log").read_text(errors="replace")


def sse_events_of(lines) -> list[dict]:
    return [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]


def test_with_no_replica_left_requests_fail_fast(two_replicas):
    svc = two_replicas
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(generate, svc, "Once upon a time", **LONG)
        busiest_slot(svc)
        for slot in list(svc.replicas):
            svc.kill_replica(slot)
        killed = time.monotonic()
        response = in_flight.result()
    assert time.monotonic() - killed < 10
    assert response.status_code == 424
    assert "no replica is available" in response.json()["error"]
    deadline = time.monotonic() + 10
    while records(svc) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    response = generate(svc, "Hello", max_new_tokens=4)
    assert time.monotonic() - started < 3
    assert response.status_code == 424
    assert response.json() == {"error": "Request failed during generation: no replica is available to serve the "
                               "request", "error_type": "generation"}
    assert requests.get(f"{svc.base_url}/health", timeout=5).status_code == 503


def test_redis_restart_under_load(tiny_model_dir, tmp_path_factory):
    svc = fault_service(tiny_model_dir, tmp_path_factory, "redis-restart", replicas=1)
    try:
        svc.start()
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(generate, svc, f"Once upon a time {n}", **LONG) for n in range(2)]
            stream = pool.submit(lambda: sse_events(requests.post(
                f"{svc.base_url}/generate_stream", json={"inputs": "Hello", "parameters": LONG}, stream=True,
                timeout=90)))
            busiest_slot(svc)
            port = svc.redis.port
            svc.redis.stop()
            stopped = time.monotonic()
            assert requests.get(f"{svc.base_url}/health", timeout=10).status_code == 503
            outcomes = [f.result() for f in in_flight]
            events = stream.result()
            assert time.monotonic() - stopped < 30  # clear errors, not hangs
            for response in outcomes:  # done before the restart, or a clear error
                assert response.status_code in (200, 424), response.text
            assert "error" in events[-1] or events[-1]["generated_text"] is not None
            svc.redis = EmbeddedRedis(port=port).start()
        restarted = time.monotonic()
        deadline = restarted + 30
        while requests.get(f"{svc.base_url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, svc.logs()
            time.sleep(0.2)
        while (response := generate(svc, "Hello", max_new_tokens=4, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, response.text + svc.logs()
            time.sleep(0.5)
        assert time.monotonic() - restarted < 30
        assert generate(svc, "Hello", max_new_tokens=4).status_code == 200
    finally:
        svc.stop()
