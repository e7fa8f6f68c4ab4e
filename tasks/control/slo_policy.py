"""The SLO policy (`--autoscale-policy slo`): one model's desired replica count from what its
replicas measure, so that TTFT p99 stays within `--ttft-slo` and ITL within `--itl-slo`.

A pure function of one model's observations (`decide_slo`); the autoscaler observes and acts
(tasks/control/autoscaler.py). The formula, with n the replicas serving or coming, r the
measured prefill rate of one replica (prompt tokens/s), W the prompt tokens waiting, λ the
prompt tokens arriving per second, A the expected time to add a replica (its weights over the
measured link from the placement's source, plus its start), T the TTFT SLO:

- prefill: a replica added now serves after A, when the waiting tokens will be
  W' = max(0, W + (λ - n·r)·A); the replicas then must drain W' within T and keep up with λ:
  n_prefill = max(⌈λ / (u·r)⌉, ⌈W' / (r·T)⌉), u the target utilisation;
- decode: the running requests fill KV slots (k per replica) up to the target occupancy:
  n_decode = ⌈running / (o·k)⌉; and when the measured decode step exceeds the ITL SLO, the
  batch per replica must shrink in proportion: ⌈n_active · step / ITL⌉;
- never below the replicas that the running requests need (⌈running / k⌉), never zero while a
  request waits (a model scaled to zero comes back for its first request), nor outside
  [--min-replicas, --max-replicas].

Up: at once, to the count wanted. Down: only while the count wanted *with a margin*
(every target scaled by `down_margin`) fits one replica fewer, for `hold_s` seconds on end;
then one replica, and the hold starts again (at most one down per hold). See docs/scaling.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SloTargets:
    ttft_s: float  # p99 time to first token (--ttft-slo)
    itl_s: float  # p99 inter-token latency (--itl-slo)
    min_replicas: int = 1
    max_replicas: int = 1
    utilisation: float = 0.8  # of the measured prefill rate, for the steady arrival term
    kv_occupancy: float = 0.8  # of the KV slots, for the decode term
    down_margin: float = 0.7  # scale down only if one replica fewer fits at 70% of every target
    hold_s: float = 30.0  # seconds the margin must hold before one replica goes
    assumed_prefill_rate: float = 1000.0  # prompt tokens/s per replica before any is measured


@dataclass(frozen=True)
class ModelObservation:
    now: float
    model: str
    replicas: int  # serving or coming: active + loading to serve
    active: int  # of which serve now
    waiting_tokens: int  # prompt tokens waiting (queued jobs and the replicas' waiting requests)
    arrival_tokens_per_s: float  # prompt tokens arriving per second, recently
    prefill_tokens_per_s: float  # measured prefill rate of one replica (0: none measured yet)
    add_replica_s: float  # expected seconds from a scale-up to the new replica serving
    running: int  # requests holding KV slots
    kv_slots: int  # KV slots (concurrent requests) of one replica
    decode_step_s: float = 0.0  # recent mean decode step of the active replicas (0: none)
    waiting_requests: int = 0  # requests waiting (queued jobs included): one replica at least while any


@dataclass(frozen=True)
class SloMemory:
    """What the policy remembers between ticks."""
    low_since: float | None = None  # since when one replica fewer would do (with the margin)


@dataclass(frozen=True)
class SloDecision:
    desired: int
    current: int
    reason: str
    estimate: dict = field(default_factory=dict)  # what the decision used, for logs and metrics

    @property
    def action(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"


def wanted(obs: ModelObservation, targets: SloTargets, margin: float = 1.0) -> tuple[int, dict]:
    """Replicas the observation needs with every target scaled by `margin` (1: the targets
    themselves; < 1: stricter, for scaling down), and the estimate behind it."""
    rate = obs.prefill_tokens_per_s or targets.assumed_prefill_rate
    n = max(obs.replicas, 1)
    ttft, utilisation, occupancy = targets.ttft_s * margin, targets.utilisation * margin, targets.kv_occupancy * margin
    projected = max(0.0, obs.waiting_tokens + (obs.arrival_tokens_per_s - n * rate) * obs.add_replica_s)
    prefill = max(math.ceil(obs.arrival_tokens_per_s / (utilisation * rate)), math.ceil(projected / (rate * ttft)))
    slots = max(obs.kv_slots, 1)
    decode = math.ceil(obs.running / (occupancy * slots))
    if obs.decode_step_s > targets.itl_s * margin and obs.active:
        decode = max(decode, math.ceil(obs.active * obs.decode_step_s / (targets.itl_s * margin)))
    floor = max(math.ceil(obs.running / slots), 1 if obs.waiting_requests else 0)
    count = min(max(prefill, decode, floor, targets.min_replicas), targets.max_replicas)
    estimate = {"ttft_estimate_s": round(obs.waiting_tokens / (n * rate), 3), "prefill_rate": round(rate, 1),
                "arrival_tokens_per_s": round(obs.arrival_tokens_per_s, 1), "waiting_tokens": obs.waiting_tokens,
                "projected_waiting_tokens": round(projected), "add_replica_s": round(obs.add_replica_s, 2),
                "prefill_replicas": prefill, "decode_replicas": decode, "running_floor": floor}
    return max(count, floor), estimate


def decide_slo(obs: ModelObservation, targets: SloTargets, memory: SloMemory) -> tuple[SloDecision, SloMemory]:
    n = obs.replicas
    count, estimate = wanted(obs, targets)
    if count > n:
        reason = (f"up: {estimate['prefill_replicas']} for prefill (TTFT now ~{estimate['ttft_estimate_s']} s, "
                  f"{estimate['projected_waiting_tokens']} tokens waiting in {estimate['add_replica_s']} s), "
                  f"{estimate['decode_replicas']} for decode")
        return SloDecision(count, n, reason, estimate), SloMemory()
    if n > targets.max_replicas:  # the bound came down: one at a time, like any scale-down
        return SloDecision(n - 1, n, f"{n} serving > max {targets.max_replicas}", estimate), SloMemory()
    # judged with one replica fewer: it drains the waiting tokens more slowly while a new one loads
    strict, _ = wanted(replace(obs, replicas=n - 1), targets, targets.down_margin)
    if strict >= n or n <= max(targets.min_replicas, estimate["running_floor"]):
        return SloDecision(n, n, f"hold: {count} wanted", estimate), SloMemory()
    low_since = memory.low_since if memory.low_since is not None else obs.now
    held = obs.now - low_since
    if held >= targets.hold_s:
        reason = f"down by one: {strict} would do at {targets.down_margin:.0%} of the targets for {held:.0f} s"
        return SloDecision(n - 1, n, reason, estimate), SloMemory(low_since=obs.now)
    return SloDecision(n, n, f"hold: {strict} would do for {held:.1f} s", estimate), replace(memory, low_since=low_since)
