"""A replica turning active counts as a use of its model (tasks/runtime/lifecycle.py): it takes its
model's queued requests at once, but its record shows them only at its next heartbeat, so a model
whose requests came before a long cold start looked idle and least recently used, and the new
replica was evicted for another model (or scaled to zero) the moment it turned active. Over a real
Redis, a stand-in replica (no process)."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.settings import Settings
from common.model_use import last_used, touch
from tasks.runtime.lifecycle import Lifecycle


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def test_turning_active_marks_the_model_used(connection, monkeypatch):
    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0, max_replicas=1)
    replica = SimpleNamespace(settings=settings.for_slot(0), slot=0, name="replica0@h1", redis=connection,
                              device_name="cpu:0", publish_record=lambda: None)
    lifecycle = Lifecycle(replica, shutdown=lambda name: None)
    states = iter(["loading"] * 5)
    monkeypatch.setattr(lifecycle, "observe", lambda: next(states, "active"))
    touch(connection, "a", time.time() - 40)  # its requests came 40 s ago, before its cold start
    touch(connection, "b", time.time() - 10)
    stop = threading.Event()
    thread = threading.Thread(target=lifecycle.run, args=(stop, 1.0), daemon=True)
    thread.start()
    deadline = time.time() + 10
    while lifecycle.state != "active" and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    stop.set()
    thread.join(5)
    used = last_used(connection)
    assert lifecycle.state == "active" and time.time() - used["a"] < 5  # a is the most recently used now
    assert used["a"] > used["b"]
