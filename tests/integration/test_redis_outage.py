"""A real Redis outage: the server is stopped for ~10 s while requests are in flight, then started
again on its port (empty: nothing is persisted). Requests that finished during the outage answer
200 once Redis is back (the replica's relay keeps their final events pending, the web subscribes
again and waits within its deadlines), and /metrics answers 200 throughout. The engine is paused
until Redis is down, so the requests are in flight then whatever this machine's speed."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.service import PausableService

OUTAGE = 10.0  # seconds Redis is down
REQUESTS = 2


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redis-outage")
    svc = PausableService(str(tiny_model_dir), workdir, env={
        "XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024"})
    try:
        svc.start()
        svc.wait_for_replicas(1)
        yield svc
    finally:
        svc.stop()


def generate(svc: PausableService, n: int) -> requests.Response:
    return requests.post(f"{svc.base_url}/generate", json={"inputs": f"Request {n} says",
                                                           "parameters": {"max_new_tokens": 8, "details": True}},
                         timeout=120)


def scrape_throughout(svc: PausableService, stop: threading.Event, statuses: list) -> None:
    while not stop.wait(0.5):
        statuses.append(requests.get(f"{svc.base_url}/metrics", timeout=10).status_code)


def wait_for(condition, timeout: float, what: str, svc: PausableService) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}; logs:\n{svc.logs()}"
        time.sleep(0.1)


def test_requests_that_finish_during_a_redis_outage_answer_200_once_it_is_back(svc):
    replica_log = svc.workdir / "replica0.log"
    taken = lambda: len(re.findall(r"job \S+ taken by", replica_log.read_text(errors="replace")))
    stop, statuses = threading.Event(), []
    scraper = threading.Thread(target=scrape_throughout, args=(svc, stop, statuses), daemon=True)
    svc.pause_engine()
    try:
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(generate, svc, n) for n in range(REQUESTS)]
            wait_for(lambda: taken() >= REQUESTS, 60, "the replica did not take the jobs", svc)
            scraper.start()
            svc.redis.halt()
            svc.resume_engine()  # they finish while Redis is down: their final events wait in the relay
            wait_for(lambda: "not published yet" in replica_log.read_text(errors="replace"), 30,
                     "no final event waited for Redis", svc)
            time.sleep(OUTAGE)
            assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
            svc.redis.start()
            responses = [f.result() for f in futures]
    finally:
        svc.resume_engine()
        stop.set()
        scraper.join(15)
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["details"]["generated_tokens"] == 8
    assert statuses and set(statuses) == {200}, statuses
    web_log = (svc.workdir / "web.log").read_text(errors="replace")
    assert "redis subscriber: connected again" in web_log
