"""Where a starting replica looks for its weights: the sources a scale-up stores, and the
choice of a source among the replica records in (real) Redis."""
from __future__ import annotations

import json
import threading

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.keys import replica_key
from tasks.weights.fetch import Source
from tasks.weights.sources import PeerChooser, planned_sources, store_sources

SHA = "ab" * 32


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def advertise(connection, slot: int, state: str, sha: str = SHA, replica_state: str = "loading") -> str:
    name = f"replica{slot}@h{slot}"
    record = {"slot": slot, "name": name, "state": replica_state,
              "weights": {"addr": f"http://10.0.0.{slot}:7070", "sha": sha, "state": state}}
    connection.set(replica_key(name), json.dumps(record))
    return name


def test_a_scale_up_stores_each_new_replicas_sources(connection):
    store_sources(connection, {1: [0], 2: [1, 0]})
    assert planned_sources(connection, 2) == [1, 0] and planned_sources(connection, 1) == [0]
    assert planned_sources(connection, 5) == []


def test_the_predecessor_is_waited_for_then_used(connection):
    advertise(connection, 0, "complete", replica_state="active")
    chooser = PeerChooser(connection, SHA, "replica2@h2", planned=[1, 0], wait_s=10, poll_s=0.05)
    threading.Timer(0.3, advertise, args=(connection, 1, "starting")).start()
    threading.Timer(0.6, advertise, args=(connection, 1, "fetching")).start()
    assert chooser(set()) == Source("replica1@h1", "http://10.0.0.1:7070")
    assert chooser({"replica1@h1"}) == Source("replica0@h0", "http://10.0.0.0:7070")  # it failed: the old stub
    assert chooser({"replica1@h1", "replica0@h0"}) is None


def test_a_predecessor_preparing_locally_is_skipped(connection):
    advertise(connection, 1, "preparing")
    advertise(connection, 0, "complete", replica_state="standby")
    advertise(connection, 3, "complete", sha="cd" * 32, replica_state="active")  # another model
    chooser = PeerChooser(connection, SHA, "replica2@h2", planned=[1], wait_s=10)
    assert chooser(set()).name == "replica0@h0"  # any replica holding the same model


def test_no_one_holds_it(connection):
    advertise(connection, 2, "complete")  # ourselves
    assert PeerChooser(connection, SHA, "replica2@h2", planned=[], wait_s=10)(set()) is None
