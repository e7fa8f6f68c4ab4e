"""The autoscaler's decisions: a pure function of the observed load."""
from __future__ import annotations

import pytest

from common.settings import Settings
from tasks.control.autoscaler import Memory, Observation, Policy, decide, observe, pick_down, pick_up

POLICY = Policy(min_replicas=1, max_replicas=3, up_threshold=0.8, down_threshold=0.3, hold_s=30)


def obs(now=100.0, queued=0, in_flight=0, serving=1, capacity=8) -> Observation:
    return Observation(now, queued, in_flight, serving, capacity)


def test_load_counts_queued_and_in_flight_per_batch_slot():
    assert obs(queued=4, in_flight=4, serving=2).load == 0.5
    assert obs(queued=3, serving=0).load == float("inf")
    assert obs(serving=0).load == 0.0


def test_up_at_once_by_what_the_load_needs():
    decision, memory = decide(obs(queued=10, in_flight=8), POLICY, Memory())
    assert (decision.action, decision.count) == ("up", 2)  # 18 jobs / (0.8 * 8) → 3 replicas
    assert memory == Memory()
    decision, _ = decide(obs(queued=1, in_flight=7), POLICY, Memory())
    assert (decision.action, decision.count) == ("up", 1)


def test_never_over_the_maximum():
    decision, _ = decide(obs(queued=500, serving=3), POLICY, Memory())
    assert decision.action == "hold"
    decision, _ = decide(obs(serving=5), POLICY, Memory())
    assert (decision.action, decision.count) == ("down", 2)


def test_up_to_the_minimum_even_when_idle():
    decision, _ = decide(obs(serving=0), Policy(2, 3), Memory())
    assert (decision.action, decision.count) == ("up", 2)


def test_down_only_after_the_hold_time():
    decision, memory = decide(obs(now=100, in_flight=1, serving=3), POLICY, Memory())
    assert decision.action == "hold" and memory.low_since == 100
    decision, memory = decide(obs(now=120, in_flight=1, serving=3), POLICY, memory)
    assert decision.action == "hold" and memory.low_since == 100
    decision, memory = decide(obs(now=130, in_flight=1, serving=3), POLICY, memory)
    assert (decision.action, decision.count) == ("down", 1) and memory == Memory()


def test_a_busy_moment_restarts_the_hold():
    _, memory = decide(obs(now=100, serving=2), POLICY, Memory())
    _, memory = decide(obs(now=110, in_flight=8, serving=2), POLICY, memory)  # load 0.5: in band
    assert memory.low_since is None
    decision, memory = decide(obs(now=135, serving=2), POLICY, memory)
    assert decision.action == "hold" and memory.low_since == 135


def test_never_under_the_minimum():
    decision, memory = decide(obs(now=1000, serving=1), POLICY, Memory(low_since=0))
    assert decision.action == "hold"


@pytest.mark.parametrize("can_start,expected", [(True, [2, 0, 3]), (False, [2])])
def test_standby_replicas_come_up_first(can_start, expected):
    slots = {0: {"state": "dead"}, 1: {"state": "active"}, 2: {"state": "standby"}, 4: {"state": "loading"}}
    assert pick_up(slots, 3, slot_count=5, can_start=can_start) == expected


def test_the_least_busy_active_replica_goes_down_first():
    slots = {0: {"state": "active", "running": 2}, 1: {"state": "active", "running": 0},
             2: {"state": "active", "running": 0}, 3: {"state": "standby"}}
    assert pick_down(slots, 1) == [2]
    assert pick_down(slots, 5) == [2, 1, 0]


def test_observe_counts_loading_replicas_as_coming_capacity():
    slots = {0: {"state": "active", "running": 3, "waiting": 1}, 1: {"state": "loading"},
             2: {"state": "standby"}, 3: {"state": "draining", "running": 5},
             4: {"state": "loading", "target": "standby"}}
    o = observe(slots, queued=2, settings=Settings(max_batch_size=4), now=1.0)
    assert (o.serving, o.in_flight, o.queued, o.capacity_per_replica) == (2, 4, 2, 4)


def test_policy_from_settings():
    policy = Policy.from_settings(Settings(min_replicas=1, max_replicas=3, scale_down_hold=5))
    assert (policy.min_replicas, policy.max_replicas, policy.hold_s) == (1, 3, 5)
    assert Policy.from_settings(Settings(num_replicas=2)).max_replicas == 2  # 0: the replicas started
    with pytest.raises(ValueError):
        Settings(down_target="sideways")
