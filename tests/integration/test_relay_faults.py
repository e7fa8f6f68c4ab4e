"""Redis failing under a replica's stream relay mid-generation, for real: the replica logs in
to Redis as its own ACL user, and the test takes PUBLISH away from that user (a NOPERM error on
every publish) while the web, its heartbeat and its Celery consumer keep working. Every request
must end within its deadlines, none waiting for the request timeout: an outage shorter than the
relay's retries costs nothing, a request that lost no event gets its answer when PUBLISH is back,
and only a stream that lost tokens fails. The tests control timing rather than guess how fast
this machine is: every engine step takes at least STEP seconds, so LONG requests are still
generating when PUBLISH is taken away; a test holds the engine between steps where it matters
(PausableService); an outage ends when the replica's log shows the relay met it, not after a
sleep."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tasks.runtime.stream_relay import PUBLISH_FAILED
from tests.integration.test_faults import FAST, records
from tests.service import PausableService, Service

SILENCE = 12.0  # REPLICA_SILENCE_TIMEOUT; the relay retries for ~1.5 s (slack for a loaded machine)
REQUEST_TIMEOUT = 120.0
LONG = {"max_new_tokens": 300}
STEP = 0.03  # seconds at least per engine step (tests.integration.gated_worker): LONG lasts >= 9 s


class ReplicaUserService(PausableService):
    """The replicas connect as ACL user `replica`, whose PUBLISH the test can take away; the
    test can pause their engines (PausableService)."""

    def start_replica(self, slot: int):
        admin = redis.Redis.from_url(self.redis.url)
        admin.execute_command("ACL", "SETUSER", "replica", "on", ">secret", "~*", "&*", "+@all")
        shared = self.env
        self.env = {**shared, "REDIS_URL": f"redis://replica:secret@127.0.0.1:{self.redis.port}/0"}
        try:
            return super().start_replica(slot)
        finally:
            self.env = shared

    def replica_publish(self, allowed: bool) -> None:
        redis.Redis.from_url(self.redis.url).execute_command(
            "ACL", "SETUSER", "replica", "+publish" if allowed else "-publish")


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("relay-faults")
    env = {**FAST, "REPLICA_SILENCE_TIMEOUT": str(SILENCE), "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
           "XDG_CACHE_HOME": str(workdir / "cache"), "ENGINE_STEP_DELAY": str(STEP),
           "HEARTBEAT_TTL": "10"}  # no replica dies here: a late heartbeat on a busy machine must not look like one
    service = ReplicaUserService(str(tiny_model_dir), workdir, env=env)
    try:
        service.start()
        yield service
    finally:
        service.stop()


def generate(svc: Service, inputs: str, **parameters) -> tuple[requests.Response, float]:
    response = requests.post(f"{svc.base_url}/generate", json={"inputs": inputs, "parameters": parameters},
                             timeout=REQUEST_TIMEOUT + 30)
    return response, time.monotonic()


def stream(svc: Service, inputs: str, first_token: list, **parameters) -> tuple[list[dict], float]:
    response = requests.post(f"{svc.base_url}/generate_stream", json={"inputs": inputs, "parameters": parameters},
                             stream=True, timeout=REQUEST_TIMEOUT + 30)
    events = []
    for event in sse_events_iter(response):
        events.append(event)
        first_token.append(True)
    return events, time.monotonic()


def sse_events_iter(response):
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            yield json.loads(line[len(b"data:"):])


def in_flight(svc: Service, pool: ThreadPoolExecutor, running: int = 3):
    """Two JSON requests and one stream, all generating on the replica (once those an earlier
    test gave up on are cancelled: their logs and counts must not be taken for these)."""
    wait_until(lambda: sum(r.get("running", 0) for r in records(svc).values()) == 0, svc)
    first_token: list = []
    jsons = [pool.submit(generate, svc, f"Once upon a time {n}", **LONG) for n in range(2)]
    sse = pool.submit(stream, svc, "Hello", first_token, **LONG)
    deadline = time.monotonic() + 60
    while not (first_token and sum(r.get("running", 0) for r in records(svc).values()) >= running):
        assert time.monotonic() < deadline, svc.logs()
        time.sleep(0.05)
    return jsons, sse


def wait_recovered(svc: Service) -> None:
    deadline = time.monotonic() + 30
    while (response := generate(svc, "Hello", max_new_tokens=4)[0]).status_code != 200:
        assert time.monotonic() < deadline, response.text + svc.logs()
        time.sleep(0.5)


def test_relay_that_cannot_publish_fails_every_request_within_the_silence_deadline(svc):
    with ThreadPoolExecutor(4) as pool:
        jsons, sse = in_flight(svc, pool)
        svc.replica_publish(False)
        cut = time.monotonic()
        try:
            outcomes = [f.result() for f in jsons]
            events, stream_ended = sse.result()
        finally:
            svc.replica_publish(True)
    silent = {"error": "Request failed during generation: replica stopped responding", "error_type": "generation"}
    for response, ended in outcomes:  # the replica is alive (heartbeat) but says nothing: silence
        assert response.status_code == 424 and response.json() == silent, response.text
        assert ended - cut < SILENCE + 10, f"{ended - cut:.1f} s: waited past the silence deadline"
    assert events[-1] == silent
    assert sum("error" in e for e in events) == 1
    assert stream_ended - cut < SILENCE + 10
    wait_recovered(svc)


def test_an_outage_shorter_than_the_retries_loses_nothing(svc):
    """PUBLISH comes back as soon as the relay's first try failed: its retries (~1.5 s of backoff)
    cover the outage."""
    failed_tries = lambda: replica_log(svc).count("not published (try 1 of")
    with ThreadPoolExecutor(4) as pool:
        jsons, sse = in_flight(svc, pool)
        before = failed_tries()
        svc.replica_publish(False)
        try:
            wait_until(lambda: failed_tries() > before, svc)
        finally:
            svc.replica_publish(True)
        outcomes = [f.result()[0] for f in jsons]
        events, _ = sse.result()
    assert [r.status_code for r in outcomes] == [200, 200], [r.text for r in outcomes]
    assert all(r.json()["generated_text"] for r in outcomes)
    tokens = [e for e in events if "token" in e]
    assert [e["index"] for e in tokens] == list(range(1, len(tokens) + 1))  # no gap, no duplicate
    assert events[-1]["generated_text"] is not None and "error" not in events[-1]


def test_an_outage_past_the_retries_fails_what_it_lost_with_the_relays_error(svc):
    """The stream loses tokens (its engine steps only once PUBLISH is gone): it ends with the
    relay's error as soon as Redis takes it, before the silence deadline. A job taken during the
    outage could not say so: it fails the same way, long before the queue deadline. The JSON
    requests lost nothing: whether they finish during the outage or after it, they get their 200."""
    with ThreadPoolExecutor(5) as pool:
        jsons, sse = in_flight(svc, pool)
        svc.pause_engine()
        try:
            svc.replica_publish(False)
            cut = time.monotonic()
        finally:
            svc.resume_engine()
        log_before = replica_log(svc)
        during = pool.submit(generate, svc, "Hello there", max_new_tokens=4)
        try:  # past the relay's retries: it failed the stream and the job it could not announce
            wait_until(lambda: all(replica_log(svc).count(line) > log_before.count(line)
                                   for line in ("; failing it", "could not announce the job")), svc)
        finally:
            svc.replica_publish(True)
        events, stream_ended = sse.result()
        late, late_ended = during.result()
        outcomes = [f.result()[0] for f in jsons]
    assert events[-1].get("error_type") == "incomplete_generation", events[-1]
    assert PUBLISH_FAILED in events[-1]["error"]
    assert stream_ended - cut < SILENCE
    assert late.status_code == 500 and late.json() == {"error": PUBLISH_FAILED, "error_type": "incomplete_generation"}
    assert late_ended - cut < SILENCE
    assert [r.status_code for r in outcomes] == [200, 200], [r.text for r in outcomes]
    assert all(r.json()["generated_text"] for r in outcomes)
    wait_recovered(svc)


def test_a_json_request_that_finishes_during_an_outage_gets_its_answer_when_publish_is_back(svc):
    """The case a faster engine turned up: the request is announced (its `started` event went
    out), generates all its tokens while PUBLISH is refused, and its final waits past every retry.
    It is not failed for that: when PUBLISH is back the client gets its 200 with the full text."""
    prompt, parameters = "Once upon a time", {"max_new_tokens": 64, "details": True}
    reference = generate(svc, prompt, **parameters)[0].json()
    log = svc.workdir / "replica0.log"
    waited_before = log.read_text(errors="replace").count("the final event on")
    with ThreadPoolExecutor(1) as pool:
        svc.pause_engine()
        try:
            pending = pool.submit(generate, svc, prompt, **parameters)
            wait_until(lambda: sum(r.get("waiting", 0) for r in records(svc).values()) >= 1, svc)  # announced
            svc.replica_publish(False)
        finally:
            svc.resume_engine()
        try:  # the engine finishes the request; its final fails every retry and waits
            wait_until(lambda: log.read_text(errors="replace").count("the final event on") > waited_before, svc)
            time.sleep(1.0)  # a few more passes of the relay with the final pending
            assert not pending.done(), pending.result()[0].text
        finally:
            svc.replica_publish(True)
        response, _ = pending.result()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"] == reference["generated_text"]
    assert body["details"]["generated_tokens"] == 64
    assert [t["id"] for t in body["details"]["tokens"]] == [t["id"] for t in reference["details"]["tokens"]]


def replica_log(svc: Service) -> str:
    return (svc.workdir / "replica0.log").read_text(errors="replace")


def wait_until(condition, svc: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, svc.logs()
        time.sleep(0.05)
