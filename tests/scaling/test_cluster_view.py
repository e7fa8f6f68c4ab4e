"""The cluster view (slot registry + heartbeats) and the scaling command's schema."""
from __future__ import annotations

import pytest
from marshmallow import ValidationError

from tasks.control.cluster import START_TIMEOUT_S, merge_slots
from tasks.runtime.lifecycle import observed_state
from web.cluster_schemas import ModifyClusterStateSchema


def test_observed_state():
    assert observed_state(loaded=False, consuming=True, in_flight=0) == "loading"
    assert observed_state(loaded=True, consuming=True, in_flight=3) == "active"
    assert observed_state(loaded=True, consuming=False, in_flight=3) == "draining"
    assert observed_state(loaded=True, consuming=False, in_flight=0) == "standby"


def test_merge_slots():
    now = 1000.0
    registry = {
        0: {"slot": 0, "name": "replica0@h", "state": "active", "by": "replica"},
        1: {"slot": 1, "name": "replica1@h", "state": "stopped", "by": "replica"},
        2: {"slot": 2, "name": "replica2@h", "state": "active", "by": "replica"},  # heartbeat gone
        3: {"slot": 3, "state": "loading", "by": "control", "updated_at": now - 5},  # being started
        4: {"slot": 4, "state": "loading", "by": "control", "updated_at": now - START_TIMEOUT_S - 1},
    }
    records = [{"slot": 0, "name": "replica0@h", "state": "draining", "running": 2}]
    slots = merge_slots(registry, records, now)
    assert {s: v["state"] for s, v in slots.items()} == {0: "draining", 1: "stopped", 2: "dead", 3: "loading",
                                                          4: "dead"}
    assert slots[0]["alive"] and slots[0]["running"] == 2 and not slots[2]["alive"]


def test_a_start_on_a_host_whose_agent_is_gone_is_dead():
    registry = {1: {"slot": 1, "host": "h1", "device": "cpu:0", "state": "loading", "by": "control", "updated_at": 99},
                2: {"slot": 2, "host": "h2", "device": "cpu:0", "state": "loading", "by": "agent", "updated_at": 99}}
    slots = merge_slots(registry, [], now=100.0, hosts={"h1"})
    assert (slots[1]["state"], slots[2]["state"]) == ("loading", "dead")


@pytest.mark.parametrize("body,kind,slots,sources", [
    ({"type": "TriggerNormalUp", "data": {"old_stub_indices": [0], "new_stub_indices": [1, 2]}}, "up", [1, 2], [0]),
    ({"type": "TriggerPrefillUp", "data": {"old_stub_indices": [], "new_stub_indices": [1]}}, "up", [1], []),
    ({"type": "TriggerNoramalDown", "data": {"stub_indices": [2]}}, "down", [2], []),
    ({"type": "TriggerScaleDown", "data": {"stub_indices": [2]}}, "down", [2], []),
    ({"type": "TriggerMutation", "data": {"stub_indices": [1]}}, "mutation", [1], []),
])
def test_adjacently_tagged_commands(body, kind, slots, sources):
    command = ModifyClusterStateSchema().load(body)
    assert (command.kind, command.slots, command.sources, command.trigger) == (kind, slots, sources, body["type"])


@pytest.mark.parametrize("body", [
    {"type": "TriggerNormalUp", "data": {"stub_indices": [1]}},
    {"type": "TriggerNormalDown", "data": {"stub_indices": []}},
    {"type": "TriggerNormalDown", "data": {"stub_indices": [True]}},
    {"type": "TriggerNormalDown", "data": {"stub_indices": [1.5]}},
    {"data": {"stub_indices": [1]}},
])
def test_bad_commands(body):
    with pytest.raises(ValidationError):
        ModifyClusterStateSchema().load(body)
