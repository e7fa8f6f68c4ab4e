"""Prefix affinity seen from the web (tasks/client/affinity.py), on real Redis with scripted
replicas: a prompt goes to the own queue of the replica that served its prefix, and never stays
stranded there (the real service, with a replica SIGKILLed: tests/integration/test_prefix_cache.py)."""
from __future__ import annotations

import pytest

from common.keys import GENERATION_QUEUE, replica_queue
from common.protocol import EVENT_STARTED, StreamEvent
from tasks.client.affinity import KEY_BLOCK, PrefixAffinity, Routing, prefix_keys
from tasks.client.generation_client import GenerationClient
from tests.web.fake_replica import FakeReplica, register_replica, reply
from web.app import create_app

LONG = " ".join(["the capital of france is paris"] * 30)  # 180 words: two keys of the word-level tokenizer
OTHER = " ".join(["hello world a b c d"] * 30)


def served_by(name: str):
    """A replica's script: `started` names it, every event carries the job's attempt."""
    def script(job):
        for event in reply([" ok"])(job):
            if isinstance(event, StreamEvent):
                event.attempt = job.attempt or None
                if event.kind == EVENT_STARTED:
                    event.replica = name
            yield event
    return script


@pytest.fixture
def long_settings(settings):
    return settings.replace(max_input_tokens=400, max_total_tokens=420, replica_check_interval=0.1,
                            affinity_wait=0.5, queue_timeout=10)


def queued(redis_client, queue: str) -> int:
    return redis_client.llen(queue)


def test_prefix_keys_name_whole_blocks_and_chain():
    prompt = list(range(3 * KEY_BLOCK + 5))
    keys = prefix_keys(prompt)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert prefix_keys(prompt[: 2 * KEY_BLOCK] + [9] * KEY_BLOCK)[:2] == keys[:2]  # shared blocks, shared keys
    assert prefix_keys([7] + prompt[1:])[0] != keys[0]  # one token changes every key after it
    assert prefix_keys(prompt, salt="adapter")[0] != keys[0]
    assert prefix_keys(prompt[: KEY_BLOCK - 1]) == []


def test_a_prompt_goes_to_the_replica_that_served_its_prefix(long_settings, redis_url, redis_client):
    register_replica(redis_url, slot=0, kv_slots=4)
    client = create_app(long_settings).test_client()
    with FakeReplica(redis_url, served_by("replica1@test"), name="replica1@test"):
        assert client.post("/generate", json={"inputs": LONG}).status_code == 200
    # Nobody consumes now: where the next jobs wait shows where they were sent.
    register_replica(redis_url, slot=1, kv_slots=4)
    generation, service = GenerationClient(long_settings), client.application.extensions["blitzscale"]
    for text in (LONG + " and more", OTHER):
        generation.submit(service.validate({"inputs": text}, stream=False, full_text_default=False).job).close()
    assert queued(redis_client, replica_queue("replica1@test")) == 1  # the same first blocks
    assert queued(redis_client, GENERATION_QUEUE) == 1  # a prompt no replica served


@pytest.mark.parametrize("record", [{"state": "draining"}, {"running": 3, "waiting": 1}],
                         ids=["not-active", "overloaded"])
def test_a_replica_that_cannot_take_more_gets_no_affinity(long_settings, redis_url, redis_client, record):
    register_replica(redis_url, slot=1, kv_slots=4, **record)
    register_replica(redis_url, slot=0, kv_slots=4)  # something serves
    app = create_app(long_settings)
    service = app.extensions["blitzscale"]
    job = service.validate({"inputs": LONG}, stream=False, full_text_default=False).job
    PrefixAffinity(redis_client, True).served(Routing(prefix_keys(job.input_ids)), "replica1@test")
    GenerationClient(long_settings).submit(job).close()
    assert queued(redis_client, replica_queue("replica1@test")) == 0
    assert queued(redis_client, GENERATION_QUEUE) == 1


def test_a_job_its_replica_does_not_take_goes_to_the_shared_queue(long_settings, redis_url, redis_client):
    """replica0 served the prefix and looks active, but takes nothing: after --affinity-wait the
    job goes to the shared queue as attempt 1, which replica1 serves; the stale copy stays behind
    (a replica that takes it later skips it: tests/web/test_failover.py)."""
    register_replica(redis_url, slot=0, kv_slots=4)
    app = create_app(long_settings)
    job = app.extensions["blitzscale"].validate({"inputs": LONG}, stream=False, full_text_default=False).job
    PrefixAffinity(redis_client, True).served(Routing(prefix_keys(job.input_ids)), "replica0@test")
    with FakeReplica(redis_url, served_by("replica1@test"), name="replica1@test") as replica1:
        response = app.test_client().post("/generate", json={"inputs": LONG})
    assert response.status_code == 200, response.get_json()
    assert [j.attempt for j in replica1.jobs] == [1]
    assert queued(redis_client, replica_queue("replica0@test")) == 1


def test_without_prefix_caching_nothing_is_routed(long_settings, redis_url, redis_client):
    register_replica(redis_url, slot=0, kv_slots=4)
    settings = long_settings.replace(prefix_caching=False)
    job = create_app(settings).extensions["blitzscale"].validate({"inputs": LONG}, stream=False,
                                                                  full_text_default=False).job
    PrefixAffinity(redis_client, True).served(Routing(prefix_keys(job.input_ids)), "replica0@test")
    GenerationClient(settings).submit(job).close()
    assert queued(redis_client, GENERATION_QUEUE) == 1


def test_a_burst_sharing_a_prefix_fills_half_a_replica_and_spreads_the_rest(long_settings, redis_url, redis_client):
    """replica0 served the prefix and its record shows it idle (a record is up to seconds old):
    the jobs routed to it count against it at once, so half its KV slots go to its own queue and
    the rest to the shared queue, where every replica takes work; the queue size shows them all."""
    register_replica(redis_url, slot=0, kv_slots=8)
    register_replica(redis_url, slot=1, kv_slots=8)
    app = create_app(long_settings)
    service = app.extensions["blitzscale"]
    jobs = [service.validate({"inputs": f"{LONG} question {n}"}, stream=False, full_text_default=False).job
            for n in range(8)]
    PrefixAffinity(redis_client, True).served(Routing(prefix_keys(jobs[0].input_ids)), "replica0@test")
    generation = GenerationClient(long_settings)
    for job in jobs:
        generation.submit(job).close()
    assert queued(redis_client, replica_queue("replica0@test")) == 4  # own_queue_bound(8)
    assert queued(redis_client, GENERATION_QUEUE) == 4
    assert generation.queue_size() == 8
    assert "tgi_queue_size 8.0" in app.test_client().get("/metrics").get_data(as_text=True)
