"""A burst through the real service: twice TGI's default `--max-concurrent-requests` at once,
half /generate and half /generate_stream. Every admitted request succeeds and the excess gets
TGI's 429 at once: none fails on the web's own connection pools (before, a 424 `Too many
connections` failed most of such a burst), and every failure is logged and counted by reason.
The engine is paused while the burst arrives, so exactly the limit is admitted whatever this
machine's speed."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from common.settings import Settings
from tests.service import PausableService

LIMIT = Settings.__dataclass_fields__["max_concurrent_requests"].default  # TGI's default, 128
OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}
ROUTES = ("/generate_stream", "/generate")  # request n goes to ROUTES[n % 2]


@pytest.fixture(scope="module")
def paused(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("burst")
    svc = PausableService(str(tiny_model_dir), workdir, env={
        "XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024"})
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def send(svc: PausableService, n: int) -> tuple[int, dict]:
    """(status, body): the JSON body, or a stream's last event."""
    body = {"inputs": f"Request {n} says", "parameters": {"max_new_tokens": 16}}
    if ROUTES[n % 2] == "/generate":
        response = requests.post(f"{svc.base_url}/generate", json=body, timeout=300)
        return response.status_code, response.json()
    response = requests.post(f"{svc.base_url}/generate_stream", json=body, stream=True, timeout=300)
    if response.status_code != 200:
        return response.status_code, response.json()
    events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    return response.status_code, events[-1]


def test_every_admitted_request_of_a_burst_succeeds_and_the_excess_gets_429(paused):
    svc = paused
    burst = 2 * LIMIT
    svc.pause_engine()
    try:
        with ThreadPoolExecutor(burst) as pool:
            futures = [pool.submit(send, svc, n) for n in range(burst)]
            deadline = time.monotonic() + 120
            while sum(f.done() for f in futures) < burst - LIMIT:  # the refused answer at once
                assert time.monotonic() < deadline, svc.logs()
                time.sleep(0.1)
            refused = [f.result() for f in futures if f.done()]
            assert all(status == 429 for status, _ in refused), Counter(s for s, _ in refused)
            svc.resume_engine()
            results = [f.result() for f in futures]
    finally:
        svc.resume_engine()
    assert Counter(status for status, _ in results) == {200: LIMIT, 429: LIMIT}
    for status, body in results:
        if status == 429:
            assert body == OVERLOADED
        else:  # JSON bodies and streams' last events carry the whole text
            assert "error" not in body and body["generated_text"], body
    metrics = requests.get(f"{svc.base_url}/metrics", timeout=30).text
    assert f'tgi_request_failure_total{{err="overloaded",reason="overloaded"}} {float(LIMIT)}' in metrics
    logged = re.findall(r"WARNING .*request failed: (\S+) answered (\d+) overloaded",
                        (svc.workdir / "web.log").read_text(errors="replace"))
    refused_routes = [ROUTES[n % 2] for n, (status, _) in enumerate(results) if status == 429]
    assert Counter(logged) == Counter((route, "429") for route in refused_routes)  # each once, with its route
