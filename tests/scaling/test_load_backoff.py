"""Replicas that cannot load (a misconfigured model or adapter): the autoscaler backs off with
growing delays instead of restarting them in a loop, and says why in its state (`/cluster_state`'s
`autoscaler.backoff`). Over a real Redis and a host agent's record, as test_scale_up_blocked."""
from __future__ import annotations

import json
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord, Place
from common.keys import SCALE_COUNTERS_KEY, SLOTS_KEY, agent_commands_key, agent_key
from common.settings import Settings
from tasks.control.autoscaler import Autoscaler
from tasks.control.load_backoff import LoadBackoff, backoff_delay, load_failure

REASON = "LoRA adapter 'ft': module model.embed_tokens: LoRA on the input embeddings is not supported"


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def failed(slot: int, at: float) -> dict:
    return {"slot": slot, "host": "h1", "device": "cpu:0", "state": "dead", "by": "replica", "updated_at": at,
            "error": REASON, "cannot_load": True}


def test_each_failure_doubles_the_wait_up_to_the_cap():
    assert [backoff_delay(n, 5, 60) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
    backoff = LoadBackoff(base_s=5, cap_s=60)
    backoff.observe({0: failed(0, 1.0)}, now=100)
    backoff.observe({0: failed(0, 1.0)}, now=101)  # the same failure seen again counts once
    assert backoff.holds(104) and not backoff.holds(105)
    assert backoff.view(101) == {"failures": 1, "reason": REASON, "retry_in_s": 4.0}
    backoff.observe({0: failed(0, 2.0)}, now=110)
    assert backoff.view(110)["failures"] == 2 and backoff.holds(119.9) and not backoff.holds(120)
    backoff.observe({0: {"slot": 0, "state": "active", "updated_at": 3.0}}, now=121)  # it loaded after all
    assert backoff.view(121) is None and not backoff.holds(121)


def test_what_it_remembers_stays_one_entry_per_slot_however_long_it_runs():
    backoff = LoadBackoff(base_s=5, cap_s=60)
    for n in range(1, 1001):  # a replica failing again and again, for days
        backoff.observe({0: failed(0, float(n)), 1: failed(1, float(n))}, now=float(n))
    assert backoff.view(1000.0)["failures"] == 2000
    assert len(backoff._counted) == 2


def test_serve_sees_only_failures_of_its_own_run():
    assert load_failure({0: failed(0, 50.0)}, since=100.0) is None
    assert load_failure({0: {"slot": 0, "state": "dead", "updated_at": 150.0}}, since=100.0) is None
    assert load_failure({1: failed(1, 150.0)}, since=100.0) == f"replica1 cannot load: {REASON}"


def test_the_autoscaler_backs_off_a_replica_that_cannot_load_and_shows_why(connection):
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", min_replicas=1, max_replicas=2)
    connection.set(agent_key("h1"), AgentRecord("h1", 1, (Place("cpu:0"),)).to_json(), ex=60)
    connection.hset(SLOTS_KEY, "0", json.dumps(failed(0, time.time())))
    autoscaler = Autoscaler(settings, backoff=LoadBackoff(base_s=0.5, cap_s=60))

    for _ in range(3):  # within the first wait: nothing starts, however often it looks
        decision = autoscaler.tick()
    assert (decision.action, decision.count) == ("up", 1)
    assert not connection.llen(agent_commands_key("h1")), "a replica that cannot load was started again"
    state = autoscaler.control.autoscaler_state()
    assert state["backoff"]["failures"] == 1 and state["backoff"]["reason"] == REASON
    assert int(connection.hget(SCALE_COUNTERS_KEY, "scale_up_blocked:cannot_load")) == 3
    assert json.loads(connection.hget(SLOTS_KEY, "0"))["error"] == REASON

    time.sleep(0.6)  # the first wait is over: one start
    autoscaler.tick()
    assert connection.llen(agent_commands_key("h1")) == 1

    connection.delete(agent_commands_key("h1"))
    connection.hset(SLOTS_KEY, "0", json.dumps(failed(0, time.time())))  # it failed again: twice as long
    autoscaler.tick()
    state = autoscaler.control.autoscaler_state()
    assert state["backoff"]["failures"] == 2 and state["backoff"]["retry_in_s"] == 1.0
    assert not connection.llen(agent_commands_key("h1"))


def test_a_model_that_cannot_load_holds_back_only_its_own_replicas(connection):
    # Two models on two places: b's replica cannot load; a's first replica must still start.
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", models="a=/m/a,b=/m/b",
                        min_replicas=1, max_replicas=1)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    connection.hset(SLOTS_KEY, "1", json.dumps({**failed(1, time.time()), "device": "cpu:1"}))
    autoscaler = Autoscaler(settings, backoff=LoadBackoff(base_s=60, cap_s=60))

    autoscaler.tick()
    started = [json.loads(c)["slot"] for c in connection.lrange(agent_commands_key("h1"), 0, -1)]
    assert started == [0], "model a's replica was held back by model b's load failure"
    state = autoscaler.control.autoscaler_state()
    assert state["models"]["b"]["backoff"]["reason"] == REASON and state["models"]["a"]["backoff"] is None


def test_serve_keeps_serving_the_other_models_when_one_cannot_load(connection):
    # `serve` stops on a replica that cannot load (a configuration error); with several models
    # that is one model's, possibly at a cold start hours in: its requests fail naming why, and
    # the other models must keep serving, not go down with it.
    from tasks.control.load_backoff import replica_cannot_load

    url = connection.connection_pool.connection_kwargs
    redis_url = f"redis://{url['host']}:{url['port']}/0"
    connection.hset(SLOTS_KEY, "1", json.dumps(failed(1, time.time())))
    assert replica_cannot_load(Settings(redis_url=redis_url, models="a=/m/a,b=/m/b"), since=0.0)() is None
    assert replica_cannot_load(Settings(redis_url=redis_url, num_replicas=2), since=0.0)() == \
        f"replica1 cannot load: {REASON}"  # one model: the service stops, saying why, as before
