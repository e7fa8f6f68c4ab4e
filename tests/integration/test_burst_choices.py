"""A burst of multi-choice OpenAI requests through the real service: 4 × `--max-concurrent-requests`
/v1/completions at once, each with 4 prompts and `n: 2` (8 jobs a request), half streamed. Every
admitted request succeeds, the excess gets 429, nothing is a 5xx, and each web process keeps a
fixed number of Redis connections (one subscriber for all the requests' channels), far fewer than
the jobs in flight. The engine is paused while the burst arrives, so exactly the limit is admitted
whatever this machine's speed."""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.connections import ConnectionPeak
from tasks.client.generation_client import COMMAND_CONNECTIONS, RESERVED_CONNECTIONS
from tests.service import PausableService

LIMIT = 16
PROMPTS, SAMPLES = 4, 2
BROKER_CONNECTIONS = 10 + 2  # kombu's producer pool (broker_pool_limit) and its own connection
BOUND = COMMAND_CONNECTIONS + RESERVED_CONNECTIONS + 1 + BROKER_CONNECTIONS  # +1: the subscriber


@pytest.fixture(scope="module")
def paused(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("burst-choices")
    svc = PausableService(str(tiny_model_dir), workdir, env={
        "XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024",
        "MAX_CONCURRENT_REQUESTS": str(LIMIT), "MAX_BATCH_SIZE": "32"})
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def send(svc: PausableService, n: int) -> tuple[int, dict]:
    """(status, body): the JSON body, or a stream's choices and error (if any) gathered."""
    stream = bool(n % 2)
    body = {"model": "tgi", "prompt": [f"Request {n} part {p} says" for p in range(PROMPTS)], "n": SAMPLES,
            "max_tokens": 4, "stream": stream}
    response = requests.post(f"{svc.base_url}/v1/completions", json=body, stream=stream, timeout=300)
    if response.status_code != 200 or not stream:
        return response.status_code, response.json()
    chunks = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    assert chunks[-1] == b"[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    errors = [e["error"] for e in events if "error" in e]
    finished = {c["index"] for e in events for c in e.get("choices", []) if c.get("finish_reason")}
    return response.status_code, {"error": errors[0]} if errors else {"choices": sorted(finished)}


def test_a_burst_of_multi_choice_requests_holds_a_fixed_number_of_redis_connections(paused):
    svc = paused
    burst = 4 * LIMIT
    svc.pause_engine()
    try:
        with ConnectionPeak(svc.redis.url) as peak, ThreadPoolExecutor(burst) as pool:
            futures = [pool.submit(send, svc, n) for n in range(burst)]
            deadline = time.monotonic() + 120
            while sum(f.done() for f in futures) < burst - LIMIT:  # the refused answer at once
                assert time.monotonic() < deadline, svc.logs()
                time.sleep(0.1)
            svc.resume_engine()
            results = [f.result() for f in futures]
    finally:
        svc.resume_engine()
    assert Counter(status for status, _ in results) == {200: LIMIT, 429: 3 * LIMIT}, results
    for status, body in results:
        if status == 200:
            assert "error" not in body, body
            assert len(body["choices"]) == PROMPTS * SAMPLES, body
    jobs_in_flight = LIMIT * PROMPTS * SAMPLES
    print(f"peak Redis connections per web process: {dict(peak.per_process)} ({jobs_in_flight} jobs in flight)")
    assert peak.per_process, "no web connection seen in CLIENT LIST"
    assert peak.highest <= BOUND < jobs_in_flight, dict(peak.per_process)
