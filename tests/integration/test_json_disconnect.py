"""A JSON request whose client hangs up is cancelled like a stream: the web sees the closed
socket while it waits, unsubscribes, and the replica cancels the request at its next `alive`
tick. Every engine step takes 50 ms (tests.integration.gated_worker), so 1,000 new tokens last
50 s by construction; the replica must stop running it within 2 s of the hang-up."""
from __future__ import annotations

import http.client
import json
import time

import pytest
import redis

from common.keys import replica_key_pattern
from tests.service import PausableService


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("json-disconnect")
    svc = PausableService(str(tiny_model_dir), workdir, env={
        "XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "16", "MAX_TOTAL_TOKENS": "1024",
        "ENGINE_STEP_DELAY": "0.05", "KEEP_ALIVE_INTERVAL": "0.5", "HEARTBEAT_INTERVAL": "0.2"})
    try:
        svc.start()
        svc.wait_for_replicas(1)
        yield svc
    finally:
        svc.stop()


def running(svc: PausableService) -> int:
    """Requests in the replicas' batches, as their heartbeat records say."""
    connection = redis.Redis.from_url(svc.redis.url)
    records = [json.loads(r) for r in connection.mget(list(connection.scan_iter(match=replica_key_pattern()))) if r]
    return sum(int(r.get("running") or 0) for r in records)


def wait_for(condition, timeout: float) -> float:
    """Seconds it took; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 1000}}),
    ("/v1/completions", {"model": "tgi", "prompt": ["hello", "world"], "max_tokens": 1000}),
])
def test_a_json_request_whose_client_hangs_up_stops_running(svc, path, body):
    port = int(svc.base_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    wait_for(lambda: running(svc) > 0, 30)
    time.sleep(1.0)
    connection.close()  # the client hangs up
    took = wait_for(lambda: running(svc) == 0, 2.0)
    print(f"{path}: the replica stopped running it {took:.2f} s after the client hung up")
    assert "client went away, cancelling" in (svc.workdir / "replica0.log").read_text(errors="replace")
