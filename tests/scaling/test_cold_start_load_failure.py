"""A request waiting for its model's cold start fails as soon as the replica started for it cannot
load, naming why (424 `no_replica`), instead of waiting out the queue timeout. Over a real Redis
and Celery's Redis transport; the replica's failure is the slot record its lifecycle writes
(tasks/runtime/lifecycle.py `cannot_load`)."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from blitzscale.redis_server import EmbeddedRedis
from common.keys import SLOTS_KEY
from common.protocol import EVENT_ERROR, FailureReason, Job, SamplingParameters, StoppingParameters
from common.settings import Settings
from tasks.client.generation_client import GenerationClient

REASON = "model.safetensors: header too large"


@pytest.fixture
def client():
    with EmbeddedRedis() as server:
        # queue timeout far past what the check takes: reaching it is the defect
        settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, redis_url=server.url, queue_timeout=60,
                            heartbeat_ttl=0.2, replica_check_interval=0.1, keep_alive_interval=0.2)
        yield GenerationClient(settings)  # its subscriber thread is a daemon, as in the web


def cannot_load(slot: int, at: float) -> str:
    return json.dumps({"slot": slot, "host": "h1", "device": "cpu:1", "state": "dead", "by": "replica",
                       "updated_at": at, "error": REASON, "cannot_load": True})


def test_a_cold_start_that_cannot_load_fails_its_waiting_request_naming_why(client):
    client.redis.hset(SLOTS_KEY, "0", cannot_load(0, time.time()))  # model a's failure: not b's business
    job = Job(uuid.uuid4().hex, [1, 2, 3], SamplingParameters(), StoppingParameters(max_new_tokens=1), model="b")
    stream = client.submit(job)
    assert client.redis.llen("generation:b") == 1
    events = stream.events()
    for _ in range(3):  # b waits for its replica: a's failure does not fail it
        assert next(events) is None
    client.redis.hset(SLOTS_KEY, "1", cannot_load(1, time.time()))  # b's replica, started for it, fails
    last = next(event for event in events if event is not None)
    assert last.kind == EVENT_ERROR and last.reason == FailureReason.NO_REPLICA, last
    assert REASON in last.error and "replica1" in last.error
