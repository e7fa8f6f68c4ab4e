"""The SLO policy's decisions (tasks/control/slo_policy.py), as a pure function: prefill demand
from waiting tokens, the measured rate and the time to add a replica; decode demand from KV
slots and the ITL SLO; up at once, down one at a time after a hold and with a margin, never
below the running work or outside the bounds."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tasks.control.slo_policy import ModelObservation, SloMemory, SloTargets, decide_slo, wanted

TARGETS = SloTargets(ttft_s=2.0, itl_s=0.1, min_replicas=1, max_replicas=8, hold_s=30.0)
QUIET = ModelObservation(now=1000.0, model="m", replicas=2, active=2, waiting_tokens=0, arrival_tokens_per_s=0.0,
                         prefill_tokens_per_s=1000.0, add_replica_s=5.0, running=0, kv_slots=8)


def decide(obs, memory=SloMemory(), targets=TARGETS):
    return decide_slo(obs, targets, memory)


def test_waiting_tokens_past_the_slo_scale_up_at_once():
    # 2 replicas drain 2000 tokens/s: 10000 tokens waiting is 5 s of TTFT, 2.5x the SLO
    decision, _ = decide(replace(QUIET, waiting_tokens=10_000, add_replica_s=0.0))
    assert decision.action == "up" and decision.desired == 5  # 10000 / (1000 × 2 s)
    assert decision.estimate["ttft_estimate_s"] == 5.0


def test_the_lead_time_covers_the_time_to_add_a_replica():
    """What arrives while the new replica loads must be drained too: a slower weight source
    (a longer add) asks for more replicas now."""
    busy = replace(QUIET, waiting_tokens=2000, arrival_tokens_per_s=3000.0)
    fast, _ = decide(replace(busy, add_replica_s=0.5))
    slow, _ = decide(replace(busy, add_replica_s=10.0))
    # 0.5 s: 2000 + (3000 - 2000) × 0.5 = 2500 tokens → 2; steady 3000 / 800 → 4
    assert fast.desired == 4 and fast.estimate["projected_waiting_tokens"] == 2500
    # 10 s: 2000 + 1000 × 10 = 12000 tokens to drain within 2 s → 6
    assert slow.desired == 6 and slow.estimate["projected_waiting_tokens"] == 12_000


def test_an_unmeasured_rate_uses_the_assumed_one():
    decision, _ = decide(replace(QUIET, prefill_tokens_per_s=0.0, waiting_tokens=6000, add_replica_s=0.0))
    assert decision.estimate["prefill_rate"] == 1000.0 and decision.desired == 3


def test_kv_slots_drive_decode_demand():
    decision, _ = decide(replace(QUIET, running=30))  # 30 / (0.8 × 8) = 4.7
    assert decision.action == "up" and decision.desired == 5 and decision.estimate["decode_replicas"] == 5


def test_decode_steps_over_the_itl_slo_shrink_the_batch_per_replica():
    decision, _ = decide(replace(QUIET, running=4, decode_step_s=0.25))  # 2 × 0.25 / 0.1
    assert decision.desired == 5


def test_bounds():
    assert decide(replace(QUIET, waiting_tokens=10**9))[0].desired == TARGETS.max_replicas
    empty = replace(QUIET, replicas=0, active=0)
    assert decide(empty)[0].desired == TARGETS.min_replicas  # up to the lower bound at once
    over = replace(QUIET, replicas=10, active=10)
    decision, _ = decide(over)
    assert decision.desired == 9  # over the upper bound: one at a time


def test_scale_down_waits_for_the_hold_then_goes_one_at_a_time():
    idle = replace(QUIET, replicas=5, active=5)
    decision, memory = decide(idle)
    assert decision.action == "hold" and memory.low_since == idle.now
    decision, memory = decide(replace(idle, now=idle.now + 29.0), memory)
    assert decision.action == "hold"
    decision, memory = decide(replace(idle, now=idle.now + 30.0), memory)
    assert (decision.action, decision.desired) == ("down", 4)  # one, though 1 would do
    # the next one needs a hold of its own
    decision, memory = decide(replace(idle, replicas=4, active=4, now=idle.now + 31.0), memory)
    assert decision.action == "hold"
    decision, memory = decide(replace(idle, replicas=4, active=4, now=idle.now + 60.0), memory)
    assert (decision.action, decision.desired) == ("down", 3)


def test_load_back_in_the_hold_restarts_it():
    idle = replace(QUIET, replicas=3, active=3)
    _, memory = decide(idle)
    busy = replace(idle, now=idle.now + 20, waiting_tokens=4500, add_replica_s=0.0)  # 3 wanted: 4500 / 2000
    decision, memory = decide(busy, memory)
    assert decision.action == "hold" and memory.low_since is None
    decision, _ = decide(replace(idle, now=idle.now + 35), memory)
    assert decision.action == "hold"  # 15 s since it went low again, not 35


def test_no_flapping_at_the_edge():
    """Load just under what n replicas carry keeps n: the margin keeps it from going down and
    coming straight back up."""
    edge = replace(QUIET, replicas=3, active=3, arrival_tokens_per_s=1700.0)  # 1700 / 800 → 3 wanted
    assert wanted(edge, TARGETS)[0] == 3
    memory, actions = SloMemory(), []
    for second in range(0, 120, 5):
        decision, memory = decide(replace(edge, now=edge.now + second), memory)
        actions.append(decision.action)
    assert set(actions) == {"hold"}
    # at 1500 tokens/s, 2 would carry it at the targets (1500 / 800 = 1.9) but not at the margin
    # (1500 / 560 = 2.7): still held
    assert wanted(replace(edge, arrival_tokens_per_s=1500.0), TARGETS)[0] == 2
    assert decide(replace(edge, arrival_tokens_per_s=1500.0, now=edge.now + 500), memory)[0].action == "hold"


@pytest.mark.parametrize("running", [17, 24])
def test_never_below_the_running_work(running):
    """24 running requests fill 3 replicas' 8 slots: at any margin, never fewer than 3."""
    floor_targets = replace(TARGETS, kv_occupancy=1.0, down_margin=1.0)
    obs = replace(QUIET, replicas=3, active=3, running=running)
    memory = SloMemory(low_since=obs.now - 1000)
    decision, _ = decide(obs, memory, floor_targets)
    assert decision.desired == 3 and decision.estimate["running_floor"] == 3


def test_a_model_at_zero_comes_back_for_one_waiting_request():
    targets = replace(TARGETS, min_replicas=0)
    zero = replace(QUIET, replicas=0, active=0)
    assert decide(zero, targets=targets)[0].desired == 0
    assert decide(replace(zero, waiting_requests=1, waiting_tokens=5), targets=targets)[0].desired == 1


def test_a_scale_down_is_not_undone_by_the_same_observation():
    """One replica fewer drains the waiting tokens more slowly while the new one loads: the margin
    must be judged with n - 1 replicas, else the policy goes 2 → 1 → 3 on an unchanged load."""
    obs = replace(QUIET, waiting_tokens=3500, arrival_tokens_per_s=500.0, add_replica_s=2.0)
    _, memory = decide(obs)
    down, _ = decide(replace(obs, now=obs.now + TARGETS.hold_s), memory)
    after, _ = decide(replace(obs, now=obs.now + TARGETS.hold_s, replicas=down.desired, active=down.desired))
    assert not (down.action == "down" and after.action == "up"), (down.reason, after.reason)
