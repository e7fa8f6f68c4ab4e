"""`ensure_replica` (tasks/control/cold_start.py) over a real Redis: a model whose only replica is
still loading for standby makes its request wait (the autoscaler activates it once loaded), not
fail at once; and a model declared with no replica at start still has a slot to start one in."""
from __future__ import annotations

import json
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord, Place
from common.keys import SLOTS_KEY, agent_key, slot_target_key
from common.settings import Settings
from tasks.control.cluster import ClusterControl
from tasks.control.cold_start import ensure_replica


@pytest.fixture
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def test_a_replica_loading_for_standby_is_waited_for_not_refused(redis_url):
    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, num_replicas=0, standby_replicas=1,
                        redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    connection.hset(SLOTS_KEY, "1", json.dumps({"slot": 1, "host": "h1", "device": "cpu:1", "state": "loading",
                                                 "by": "agent", "updated_at": time.time()}))
    connection.set(slot_target_key(1), "standby")  # b's one slot: its standby replica, loading
    assert ensure_replica(ClusterControl(settings), "b") == "waiting"


def test_models_declared_with_no_replica_at_start_each_have_a_slot():
    # --num-replicas 0 --min-replicas 0: nothing runs at start, every model starts on demand
    a, b = Settings(models="a=/m/a,b=/m/b", min_replicas=0, num_replicas=0).catalog.models
    assert (a.slots, b.slots) == (range(0, 1), range(1, 2))
    assert b.settings.replica_range == (0, 1)  # the autoscaler keeps the replica a request started


def test_a_model_whose_replica_just_failed_to_load_is_not_started_again_per_request(redis_url):
    # Each request for a broken model started (or evicted a healthy model's replica for) a process
    # that fails the same way; the autoscaler backs off, the cold start did not.
    from common.keys import agent_commands_key
    from tasks.control.cold_start import NoPlace

    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    connection.hset(SLOTS_KEY, "1", json.dumps({"slot": 1, "host": "h1", "device": "cpu:1", "state": "dead",
                                                 "by": "replica", "updated_at": time.time(),
                                                 "error": "no weights found", "cannot_load": True}))
    with pytest.raises(NoPlace, match="replica1 cannot load: no weights found"):
        ensure_replica(ClusterControl(settings), "b")
    assert not connection.llen(agent_commands_key("h1"))
    assert ensure_replica(ClusterControl(settings), "a") == "started"  # the healthy model starts as ever


def test_two_webs_cold_starting_one_model_at_once_start_one_replica(redis_url):
    import threading

    from common.keys import agent_commands_key

    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, max_replicas=2, redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    webs, outcomes, ready = [ClusterControl(settings) for _ in range(4)], [], threading.Barrier(4)

    def first_request(control):
        ready.wait()
        outcomes.append(ensure_replica(control, "b"))

    threads = [threading.Thread(target=first_request, args=(web,)) for web in webs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["serving", "serving", "serving", "started"]
    assert connection.llen(agent_commands_key("h1")) == 1


def test_one_eviction_per_place_wanted_however_many_requests_ask(redis_url):
    from common.keys import replica_key

    settings = Settings(models="a=/m/a,b=/m/b,c=/m/c", min_replicas=0, redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    for slot, device in ((0, "cpu:0"), (2, "cpu:1")):  # a and c hold both places, idle in standby
        name = f"replica{slot}@h1"
        connection.set(replica_key(name), json.dumps({"slot": slot, "name": name, "host": "h1", "device": device,
                                                      "state": "standby", "running": 0, "waiting": 0,
                                                      "updated_at": time.time()}), ex=60)
    control = ClusterControl(settings)
    assert [ensure_replica(control, "b") for _ in range(3)] == ["evicting"] * 3
    targets = [connection.get(slot_target_key(s)) for s in (0, 2)]
    assert sorted(t or b"" for t in targets) == [b"", b"stopped"], targets  # one place freed, not both


def test_a_job_queued_for_a_model_at_zero_is_never_stranded(redis_url):
    # It arrived as its model went to zero (no cold start asked): the autoscaler's next tick places one.
    from common.keys import agent_commands_key
    from tasks.control.autoscaler import Autoscaler

    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    connection.set(agent_key("h1"), AgentRecord("h1", 2, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=60)
    connection.lpush("generation:b", "a job")
    decision = Autoscaler(settings).tick()
    assert decision.action == "hold"  # a: nothing to do
    started = [json.loads(c)["slot"] for c in connection.lrange(agent_commands_key("h1"), 0, -1)]
    assert started == [1]  # b's slot
