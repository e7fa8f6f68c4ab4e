"""Placement as a plain value: which host and device each new replica gets, and where its weights
come from, computed from what the agents and replicas advertise (no processes, no Redis)."""
from __future__ import annotations

import pytest

from common.fleet import AgentRecord, Place, Placement
from tasks.control.placement import Fleet, NoFreePlace, free_places, place, reachable

SHA = "ab" * 32


def agent(host: str, *places: str, models=(), addr: str | None = None, held: dict | None = None) -> AgentRecord:
    held = held or {}
    return AgentRecord(host, places=tuple(Place(p, slot=held.get(p)) for p in places), models=tuple(models),
                       model_sha=SHA, weights_host=addr or f"127.0.0.{int(host[1:]) + 1}")


def replica(slot: int, host: str, device: str = "cpu:0", state: str = "active", weights: str = "complete",
            addr: str | None = None) -> dict:
    return {"slot": slot, "host": host, "device": device, "state": state, "alive": True, "model_sha": SHA,
            "weights": {"sha": SHA, "state": weights, "addr": addr or f"http://127.0.0.{int(host[1:]) + 1}:7070"}}


def test_three_replicas_take_three_places_spread_over_the_hosts_and_a_fourth_has_none():
    fleet = Fleet([agent("h1", "cpu:0", "cpu:1"), agent("h2", "cpu:0")], {}, SHA)
    plan = place([1, 2, 3], fleet)
    assert [(p.slot, p.host, p.device) for p in plan] == [(1, "h1", "cpu:0"), (2, "h2", "cpu:0"), (3, "h1", "cpu:1")]
    assert [p.weights for p in plan] == ["source", "peer", "host-cache"]  # 2 copies from 1; 3 maps what 1 brought

    busy = Fleet(fleet.agents, {p.slot: {"slot": p.slot, "host": p.host, "device": p.device, "state": "loading"}
                                for p in plan}, SHA)
    assert free_places(busy) == {"h1": [], "h2": []}
    with pytest.raises(NoFreePlace) as blocked:
        place([4], busy)
    assert (blocked.value.free, blocked.value.in_use) == (0, 3)
    assert "0 free, 3 in use (h1 cpu:0 (stub 1), h1 cpu:1 (stub 3), h2 cpu:0 (stub 2))" in str(blocked.value)


def test_the_host_whose_cache_holds_the_model_comes_first():
    fleet = Fleet([agent("h1", "cpu:0"), agent("h2", "cpu:0", models=[SHA[:24]])], {0: replica(0, "h0")}, SHA)
    assert place([1], fleet) == [Placement(1, "h2", "cpu:0", "host-cache")]


def test_new_replicas_on_empty_hosts_form_one_chain_from_the_source():
    fleet = Fleet([agent("h1", "cpu:0", "cpu:1"), agent("h2", "cpu:0")], {0: replica(0, "h0")}, SHA)
    plan = place([1, 2], fleet, sources=[0])
    assert plan == [Placement(1, "h1", "cpu:0", "peer", (0,)), Placement(2, "h2", "cpu:0", "peer", (1, 0))]
    fleet = Fleet([agent("h1", "cpu:0", "cpu:1"), agent("h2", "cpu:0", "cpu:1")], {0: replica(0, "h0")}, SHA)
    # the second replica of a host maps its copy, and has the first one's sources should it make it
    assert place([1, 2, 3, 4], fleet, sources=[0])[2:] == [Placement(3, "h1", "cpu:1", "host-cache", (0,)),
                                                            Placement(4, "h2", "cpu:1", "host-cache", (1, 0))]


def test_a_host_that_can_copy_comes_before_one_that_cannot():
    # h1's data plane is on a real address: it cannot reach the only holder, on loopback.
    fleet = Fleet([agent("h1", "cuda:0", addr="10.0.0.1"), agent("h2", "cuda:0", "cuda:1")],
                  {0: replica(0, "h0"), 5: replica(5, "h2", "cuda:1")}, SHA)
    assert place([1], fleet) == [Placement(1, "h2", "cuda:0", "host-cache")]  # its replica 5 holds the model
    fleet = Fleet([agent("h1", "cuda:0", addr="10.0.0.1"), agent("h2", "cuda:0")], {0: replica(0, "h0")}, SHA)
    assert place([1], fleet) == [Placement(1, "h2", "cuda:0", "peer", (0,))]


def test_ties_go_to_the_host_with_fewer_replicas():
    fleet = Fleet([agent("h1", "cpu:0", "cpu:1", "cpu:2"), agent("h2", "cpu:0", "cpu:1")],
                  {3: replica(3, "h2", "cpu:1", weights="fetching")}, None)  # model unknown: no tier applies
    assert [(p.host, p.device) for p in place([1], fleet)] == [("h1", "cpu:0")]
    # then 1 replica each: the chain's next host is the one that can copy from slot 1
    assert [(p.host, p.device, p.fetch_from) for p in place([1, 2], fleet)] == [
        ("h1", "cpu:0", ()), ("h2", "cpu:0", (1,))]


def test_a_place_is_taken_as_soon_as_a_start_names_it_and_free_again_when_its_slot_is_dead():
    slots = {1: {"slot": 1, "host": "h1", "device": "cpu:0", "state": "loading"},  # the agent does not know yet
             2: {"slot": 2, "host": "h1", "device": "cpu:1", "state": "dead"}}
    fleet = Fleet([agent("h1", "cpu:0", "cpu:1", "cpu:2", held={"cpu:2": 7})], slots, SHA)
    assert free_places(fleet) == {"h1": ["cpu:1"]}  # cpu:2: its agent still holds slot 7's process


def test_gpus_first_then_cpu_places_lowest_index_first():
    fleet = Fleet([agent("h1", "cpu:0", "cuda:3", "cuda:1")], {}, SHA)
    assert free_places(fleet) == {"h1": ["cuda:1", "cuda:3", "cpu:0"]}


@pytest.mark.parametrize("peer,host,expected", [
    ("http://10.0.0.2:7070", "10.0.0.1", True),
    ("http://127.0.0.2:7070", "127.0.0.3", True),  # hosts simulated on one machine
    ("http://127.0.0.1:7070", "10.0.0.1", False),  # another machine's loopback
    ("http://localhost:7070", "node-a", False),
    (None, "10.0.0.1", True),
])
def test_reachable(peer, host, expected):
    assert reachable(peer, host) is expected
