"""Limits through the real server: the concurrency limit held in Redis across gunicorn worker
processes (leases that expire when a process dies), and the 2 MB body limit."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from common.keys import admission_key
from tests.service import Service

LIMITS = {
    "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024", "WEB_WORKERS": "2", "MAX_CONCURRENT_REQUESTS": "2",
    "ADMISSION_LEASE_TTL": "1.5", "HEARTBEAT_TTL": "60", "QUEUE_TIMEOUT": "60", "REPLICA_CHECK_INTERVAL": "0.3",
}


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("limits")
    svc = Service(str(tiny_model_dir), workdir, env={**LIMITS, "XDG_CACHE_HOME": str(workdir / "cache")})
    try:
        svc.start()
        yield svc
    finally:
        for process in svc.replicas.values():
            process.send_signal(signal.SIGCONT)
        svc.stop()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def post(svc: Service, **body) -> requests.Response:
    return requests.post(f"{svc.base_url}/generate", json=body, timeout=60)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_limit_spans_every_web_process_and_leases_expire(limited):
    svc = limited
    leases = redis.Redis.from_url(svc.redis.url)
    workers = children(svc.web.pid)
    assert len(workers) == 2
    replica = svc.replicas[0]
    replica.send_signal(signal.SIGSTOP)  # jobs wait in the queue, holding their admission slots
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, svc, inputs="Hello", parameters={"max_new_tokens": 4}) for _ in range(2)]
            wait_until(lambda: leases.zcard(admission_key()) == 2, 10, "two requests admitted")
            for _ in range(8):  # whichever worker takes it: the count is shared
                started = time.monotonic()
                response = post(svc, inputs="Hello", parameters={"max_new_tokens": 4})
                assert time.monotonic() - started < 1
                assert response.status_code == 429
                assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            for pid in workers:  # the processes holding the leases die without releasing them
                os.kill(pid, signal.SIGKILL)
            for future in held:
                with pytest.raises(requests.RequestException):
                    future.result()
        assert leases.zcard(admission_key()) == 2
        wait_until(lambda: leases.zcount(admission_key(), time.time(), "+inf") == 0, 5, "the leases expire")
    finally:
        replica.send_signal(signal.SIGCONT)
    svc.wait_healthy(30)
    response = post(svc, inputs="Hello", parameters={"max_new_tokens": 4})
    assert response.status_code == 200, response.text
    assert leases.zcount(admission_key(), time.time(), "+inf") == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_2_mb_is_a_json_413(service, chunked):
    body = b'{"inputs": "' + b"a" * 3_000_000 + b'"}'
    data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    response = requests.post(f"{service.base_url}/generate", data=data, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error_type"] == "validation"
    assert "too large" in response.json()["error"]
