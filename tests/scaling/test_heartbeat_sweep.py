"""Queue hygiene's sweep SCANs the whole keyspace (and kombu's `unacked` hash): with millions of
affinity keys it takes seconds. It must never delay the heartbeat: a replica whose record
expires meanwhile reads as dead (its jobs sent again, its slot given away). Here the sweep is
held at a gate for as long as the test likes, and the heartbeat must go on. Real Redis; the
replica is a stand-in with what the lifecycle reads."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.keys import slot_lease_key
from common.settings import Settings
from tasks.runtime import lifecycle as lifecycle_module
from tasks.runtime.lifecycle import Lifecycle


class StandIn:
    """What Lifecycle reads of a replica (tasks/runtime/replica.py), nothing loaded."""

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.name, self.slot, self.device_name = "replica0@t", 0, "cpu:0"
        self.redis, self.settings = connection, settings
        self.engine, self.loaded, self.worker = None, False, None
        self.beats = 0

    def publish_record(self) -> None:
        self.beats += 1


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def test_the_heartbeat_goes_on_while_a_sweep_is_slow(connection, monkeypatch):
    sweeping, release = threading.Event(), threading.Event()

    def slow_sweep(*_args, **_kwargs):
        sweeping.set()
        release.wait(30)

    monkeypatch.setattr(lifecycle_module, "sweep", slow_sweep)
    replica = StandIn(connection, Settings(redis_url="redis://unused", heartbeat_ttl=2))
    stop = threading.Event()
    beating = threading.Thread(target=Lifecycle(replica, shutdown=lambda name: None).run, args=(stop, 0.05))
    beating.start()
    try:
        assert sweeping.wait(10)
        beats = replica.beats
        deadline = time.monotonic() + 10
        while replica.beats < beats + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.beats >= beats + 3, "no heartbeat while the sweep ran"
        assert connection.get(slot_lease_key(0)) == b"replica0@t"  # and the lease renewed with it
    finally:
        release.set()
        stop.set()
        beating.join(10)


def test_one_replica_of_the_cluster_sweeps_each_interval(connection):
    """Eight replicas whose sweeps all come due at once: one scans the keyspace; the next
    interval, a turn is free again."""
    from tasks.queue.hygiene import SWEEP_INTERVAL_S, take_sweep_turn

    turns = [take_sweep_turn(connection, f"replica{n}@t") for n in range(8)]
    assert turns.count(True) == 1 and turns[0]
    ttl_ms = connection.pttl("blitz:sweep-turn")
    assert 0 < ttl_ms < SWEEP_INTERVAL_S * 1000  # free before the next interval's askers come
    connection.delete("blitz:sweep-turn")  # the interval has passed
    assert take_sweep_turn(connection, "replica5@t")
