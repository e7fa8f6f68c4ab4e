"""Slots allocated cluster-wide (common/slot_leases.py), with real agents' processes and a real
Redis: agents starting at the same moment take distinct slots; a slot held by a live replica or
a start is never taken again, one whose holder is gone is; a child that dies before it ever
registered frees its place and its slot at once."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.keys import SLOTS_KEY, slot_lease_key
from common.settings import Settings
from common.slot_leases import CONTROL_OWNER, NoFreeSlot, agent_owner, allocate, claim
from tasks.control import agent as agent_module
from tasks.control.agent import HostAgent
from tasks.control import cluster as cluster_module
from tasks.control.cluster import ClusterControl, ClusterError, read_slots

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(7)"]


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def connection(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    return client


@pytest.fixture
def make_agent(redis_url, connection, monkeypatch, tmp_path):
    agents = []

    def make(host: str, argv: list[str] = SLEEPER) -> HostAgent:
        monkeypatch.setattr(agent_module, "worker_argv", lambda slot, standby=False: argv)
        settings = Settings(redis_url=redis_url, devices="cpu", weight_cache_dir=str(tmp_path / host),
                            weights_host="127.0.0.5", model_id=str(tmp_path / "no-model"))
        agents.append(HostAgent(settings, host=host, env={"PATH": os.environ["PATH"]}))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop(grace=2)


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_agents_starting_at_once_take_distinct_slots(make_agent, connection):
    agents = [make_agent(f"h{n}") for n in range(4)]
    ready = threading.Barrier(len(agents))
    started = {}

    def start(agent: HostAgent) -> None:
        ready.wait()
        started[agent.host] = agent.start_new(standby=True)

    threads = [threading.Thread(target=start, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    slots = {agent.host: next(iter(agent.children)) for agent in agents}
    assert sorted(slots.values()) == [0, 1, 2, 3] and all(started.values())
    for host, slot in slots.items():
        entry = json.loads(connection.hget(SLOTS_KEY, str(slot)))
        assert (entry["host"], entry["state"]) == (host, "loading")
        assert connection.get(slot_lease_key(slot)).decode() == agent_owner(host)
    assert set(read_slots(connection)) == {0, 1, 2, 3}


def test_a_held_slot_is_never_claimed_and_a_gone_holders_slot_is(make_agent, connection):
    make_agent("h1").announce()  # its host's agent is there: a start placed on h1 is pending, not dead
    assert claim(connection, 0, CONTROL_OWNER, {"slot": 0, "host": "h1", "state": "loading", "by": "control",
                                                "updated_at": time.time()})
    assert not claim(connection, 0, agent_owner("h2"))  # a start in flight holds it
    # A replica that died: its slot shows dead while its lease has not expired yet.
    connection.hset(SLOTS_KEY, "1", json.dumps({"slot": 1, "name": "replica1@h1", "host": "h1", "state": "active",
                                                "by": "replica", "updated_at": time.time()}))
    connection.set(slot_lease_key(1), "replica1@h1", ex=60)
    assert read_slots(connection)[1]["state"] == "dead"
    assert allocate(connection, read_slots(connection), agent_owner("h2")) == 1
    assert connection.get(slot_lease_key(1)).decode() == agent_owner("h2")


def test_a_child_that_dies_before_registering_frees_its_place_and_slot_at_once(make_agent, connection):
    agent = make_agent("h1", CRASHER)
    agent.start()  # its loop reaps exited children
    assert agent.start_new() is not None
    entry = wait_for(lambda: (e := json.loads(connection.hget(SLOTS_KEY, "0"))) and e["state"] == "dead" and e)
    assert entry and entry["error"] == "exited with 7"
    assert connection.get(slot_lease_key(0)) is None and agent.held() == {}
    assert read_slots(connection)[0]["state"] == "dead"  # not `loading` for the start timeout (300 s)
    agent_module.worker_argv = lambda slot, standby=False: SLEEPER
    assert agent.start_new() is not None and agent.devices == {0: "cpu:0"}  # the place and the slot again


def test_a_child_reaped_after_its_slot_went_to_another_start_leaves_that_start_alone(make_agent, connection):
    """Its record expired (a hung replica), so the control plane placed the slot on h2; then the
    hung child is killed and its agent reaps it: the new start's entry and lease stay."""
    agent = make_agent("h1")
    make_agent("h2").announce()  # h2's agent is there: the start placed on it is pending, not dead
    child = agent.start_new()
    assert child is not None
    # What the child's heartbeat left (its record has expired: the slot shows dead).
    connection.hset(SLOTS_KEY, "0", json.dumps({"slot": 0, "name": "replica0@h1", "host": "h1", "pid": child.pid,
                                                "state": "active", "by": "replica", "updated_at": time.time()}))
    connection.set(slot_lease_key(0), "replica0@h1", ex=60)
    placed = {"host": "h2", "state": "loading", "by": "control", "updated_at": time.time()}
    assert allocate(connection, read_slots(connection), CONTROL_OWNER, placed) == 0
    child.kill()
    child.wait(10)
    assert agent.start_new() is not None  # reaps the exited child (and frees its slot) first
    assert 0 not in agent.children
    assert json.loads(connection.hget(SLOTS_KEY, "0")) == {**placed, "slot": 0}
    assert connection.get(slot_lease_key(0)).decode() == CONTROL_OWNER


def test_an_agent_starting_while_the_control_plane_claims_a_stopped_slot_takes_another(make_agent, connection,
                                                                                       redis_url, monkeypatch):
    """The control plane's claim and its `loading` entry are one step: an agent that allocates
    right after the claim (here: exactly then) sees the slot taken, not a stopped slot whose lease
    only a stale holder (the control plane itself) has."""
    make_agent("h1").announce()
    rival = make_agent("h2")
    connection.hset(SLOTS_KEY, "0", json.dumps({"slot": 0, "name": "replica0@h1", "host": "h1", "state": "stopped",
                                                "by": "replica", "updated_at": time.time()}))
    rivals = []

    def claim_then_rival_starts(*args, **kwargs):
        taken = claim(*args, **kwargs)
        if not rivals:
            rivals.append(rival.start_new())
        return taken

    monkeypatch.setattr(cluster_module, "claim", claim_then_rival_starts)
    ClusterControl(Settings(redis_url=redis_url, manually_scale=True)).scale_up([0])
    assert rivals and rivals[0] is not None
    assert 0 not in rival.children  # the rival took another slot
    entry = json.loads(connection.hget(SLOTS_KEY, "0"))
    assert (entry["host"], entry["by"], entry["state"]) == ("h1", "control", "loading")
    assert connection.get(slot_lease_key(0)).decode() == CONTROL_OWNER


def test_a_scale_up_refused_for_one_slot_gives_the_others_back_as_they_were(make_agent, connection, redis_url):
    make_agent("h1").announce()
    make_agent("h3").announce()
    stopped = json.dumps({"slot": 0, "name": "replica0@h1", "host": "h1", "state": "stopped", "by": "replica",
                          "updated_at": time.time()})
    connection.hset(SLOTS_KEY, "0", stopped)
    connection.set(slot_lease_key(1), agent_owner("h2"), ex=60)  # an agent's start took slot 1 a moment ago
    with pytest.raises(ClusterError, match="stub 1 was just taken by another start"):
        ClusterControl(Settings(redis_url=redis_url, manually_scale=True, max_replicas=2)).scale_up([0, 1])
    assert connection.hget(SLOTS_KEY, "0").decode() == stopped and connection.get(slot_lease_key(0)) is None
    assert not connection.hexists(SLOTS_KEY, "1") and connection.get(slot_lease_key(1)).decode() == agent_owner("h2")


def test_a_models_start_takes_a_slot_in_its_own_range(make_agent, connection):
    """With several models (common/models.py), a model's replica goes in a slot of its range only."""
    make_agent("h1").announce()  # its starts are pending, not dead
    entry = {"host": "h1", "state": "loading", "by": "agent", "updated_at": time.time()}
    assert allocate(connection, read_slots(connection), agent_owner("h1"), entry, slots=range(2, 4)) == 2
    assert allocate(connection, read_slots(connection), agent_owner("h1"), entry, slots=range(2, 4)) == 3
    with pytest.raises(NoFreeSlot, match="2..3"):
        allocate(connection, read_slots(connection), agent_owner("h1"), entry, slots=range(2, 4))
    assert allocate(connection, read_slots(connection), agent_owner("h1"), entry) == 0
