"""Scale to zero never takes a replica that has just come up (tasks/control/autoscaler.py): a cold
start slower than `--scale-to-zero-after` made the model look idle since the request that caused
it, so the new replica was drained the moment it turned active, and its model's next request
paid another cold start. Over a real Redis, replica records only (no processes)."""
from __future__ import annotations

import json
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.keys import replica_key
from common.settings import Settings
from tasks.control.autoscaler import Autoscaler
from common.model_use import touch


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def publish(connection, state: str) -> None:
    view = {"slot": 0, "name": "replica0@h1", "model": "a", "host": "h1", "device": "cpu:0", "state": state,
            "running": 0, "waiting": 0, "updated_at": time.time()}
    connection.set(replica_key(view["name"]), json.dumps(view), ex=30)


def test_a_replica_that_just_came_up_is_not_scaled_to_zero_at_once(connection):
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", models="a=/m/a,b=/m/b",
                        min_replicas=0, max_replicas=1, scale_to_zero_after=10)
    autoscaler = Autoscaler(settings)
    autoscaler._started -= 60  # the autoscaler has run a minute
    touch(connection, "a", time.time() - 40)  # the request that caused the cold start, 40 s ago
    publish(connection, "loading")
    autoscaler.tick()
    publish(connection, "active")  # its queued requests are taken now; its record shows them later
    assert autoscaler.tick().action == "hold"  # not "down": idle counts from the replica's start
