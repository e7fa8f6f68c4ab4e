"""`ensure_replica` (tasks/control/cold_start.py) over a real Redis: a model whose only replica is
still loading for standby makes its request wait (the autoscaler activates it once loaded), not
fail at once."""
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

