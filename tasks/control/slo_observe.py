"""What the SLO policy (tasks/control/slo_policy.py) sees of a model, from its replicas' records
(tasks/runtime/replica.py publishes the totals) and the queue, tick after tick.

Rates come from differences between ticks of totals the replicas keep since their start, so a
replica's whole history never hides a change: the prompt tokens arriving per second (prefilled
plus the change in those waiting), smoothed over `smoothing_s`; the mean decode step over the
last tick. The prefill rate of one replica is its whole history's (prompt tokens prefilled ÷
seconds spent in prefill steps): a property of the model and device, not of the load.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from common.states import ReplicaState
from tasks.control.slo_policy import ModelObservation

STANDBY_ADD_S = 0.5  # a standby replica serves after one add_consumer
UNKNOWN_ADD_S = 30.0  # no replica has loaded yet: assume a slow start
ASSUMED_PROMPT_TOKENS = 256  # a queued job's prompt before any waiting request was measured


@dataclass
class SloObserver:
    model: str
    smoothing_s: float = 2.0
    _last: dict = field(default_factory=dict)  # replica name → its totals at the previous tick
    _last_waiting: int | None = None
    _last_at: float | None = None
    _arrival: float = 0.0
    _prompt_tokens: float = ASSUMED_PROMPT_TOKENS
    _loading_since: dict = field(default_factory=dict)  # slot → when this observer first saw it loading
    _add_samples: list = field(default_factory=list)  # seconds from loading to active, the last few

    def observe(self, slots: dict[int, dict], queued: int, now: float, batch_slots: int) -> ModelObservation:
        active = [v for v in slots.values() if v["state"] == ReplicaState.ACTIVE and v.get("alive")]
        serving = [v for v in slots.values() if v["state"] == ReplicaState.ACTIVE or (
            v["state"] == ReplicaState.LOADING and v.get("target") != ReplicaState.STANDBY)]
        records = [v for v in slots.values() if v.get("alive") and "prefill_tokens" in v]
        waiting_requests = sum(v.get("waiting", 0) for v in active)
        replica_tokens = sum(v.get("waiting_tokens", 0) for v in active)
        if waiting_requests and replica_tokens:
            self._prompt_tokens = replica_tokens / waiting_requests  # the queued jobs are like those waiting
        waiting_tokens = replica_tokens + round(queued * self._prompt_tokens)

        prefilled = decode_s = decode_steps = 0.0
        for v in records:
            last = self._last.get(v["name"])
            if last is not None:  # a replica new since the last tick adds nothing yet
                prefilled += max(0, v["prefill_tokens"] - last["prefill_tokens"])
                decode_s += max(0.0, v["decode_seconds"] - last["decode_seconds"])
                decode_steps += max(0, v["decode_steps"] - last["decode_steps"])
        self._last = {v["name"]: v for v in records}
        if self._last_at is not None and now > self._last_at:
            elapsed = now - self._last_at
            arrived = max(0.0, prefilled + waiting_tokens - self._last_waiting)
            weight = 1 - math.exp(-elapsed / self.smoothing_s)
            self._arrival += weight * (arrived / elapsed - self._arrival)
        self._last_at, self._last_waiting = now, waiting_tokens

        self._time_starts(slots, now)
        tokens = sum(v["prefill_tokens"] for v in records)
        seconds = sum(v["prefill_seconds"] for v in records)
        return ModelObservation(
            now=now, model=self.model, replicas=len(serving), active=len(active), waiting_tokens=waiting_tokens,
            waiting_requests=waiting_requests + queued, arrival_tokens_per_s=self._arrival,
            prefill_tokens_per_s=tokens / seconds if tokens and seconds > 0 else 0.0,
            add_replica_s=add_replica_seconds(slots, self._add_samples), running=sum(v.get("running", 0) for v in active),
            kv_slots=next((v["kv_slots"] for v in active if v.get("kv_slots")), batch_slots),
            decode_step_s=decode_s / decode_steps if decode_steps else 0.0)


    def _time_starts(self, slots: dict[int, dict], now: float) -> None:
        """Seconds from a slot seen `loading` to `active`: what adding a replica takes here, the
        process start and its weights (a peer copy over the link, the host cache, the source)."""
        for slot, view in slots.items():
            if view["state"] == ReplicaState.LOADING:
                self._loading_since.setdefault(slot, now)
            elif slot in self._loading_since:
                since = self._loading_since.pop(slot)
                if view["state"] == ReplicaState.ACTIVE:
                    self._add_samples[:] = [*self._add_samples[-4:], now - since]


def add_replica_seconds(slots: dict[int, dict], measured: list[float] = ()) -> float:
    """The expected time from a scale-up to the new replica serving: an add_consumer when a
    standby replica waits; else the median of the last starts measured (loading → active); else
    the live replicas' own start-to-loaded seconds (weights included, the process start not);
    else a slow start assumed."""
    if any(v["state"] == ReplicaState.STANDBY and v.get("alive") for v in slots.values()):
        return STANDBY_ADD_S
    if measured:
        return statistics.median(measured)
    loads = [v["load_seconds"] for v in slots.values() if v.get("alive") and v.get("load_seconds")]
    return statistics.median(loads) if loads else UNKNOWN_ADD_S
