"""A replica whose heartbeat was late long enough for its record to expire shows `dead`, and its
slot may be given to another start at once (common/slot_leases.py: stale holders). When that
replica comes back it must not take the slot back: the new start holds the lease and the
registry entry, and the old replica drains and exits (one replica per slot, never two).
Real replica process of the tiny model, real Redis; the late heartbeat is a SIGSTOP."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis

from common.keys import SLOTS_KEY, slot_lease_key
from common.replica_records import live_records
from common.slot_leases import agent_owner, allocate
from tasks.control.cluster import read_slots
from tests.service import Service


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("late-heartbeat")
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "HEARTBEAT_TTL": "2"}
    with Service(str(tiny_model_dir), workdir, env=env, replicas=1).running(active_replicas=1) as service:
        yield service


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_replica_back_from_a_late_heartbeat_leaves_its_given_away_slot(svc):
    connection = redis.Redis.from_url(svc.redis.url)
    replica = svc.replicas[0]
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not live_records(connection), 30, "the frozen replica's record to expire")
        assert read_slots(connection)[0]["state"] == "dead"
        entry = {"host": "h9", "state": "loading", "by": "agent", "updated_at": time.time()}
        assert allocate(connection, read_slots(connection), agent_owner("h9"), entry) == 0
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    replica.wait(60)  # it drains and exits: its slot is another start's now
    assert connection.get(slot_lease_key(0)).decode() == agent_owner("h9")
    assert json.loads(connection.hget(SLOTS_KEY, "0"))["host"] == "h9"
