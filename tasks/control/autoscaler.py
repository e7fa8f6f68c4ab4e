"""The autoscaler: moves the active replica count between --min-replicas and --max-replicas.

Load = (jobs queued in the broker + requests running or waiting in the replicas) / the batch
slots of the replicas that serve or are coming (active + loading). Over `scale_up_threshold`:
up at once, by as many replicas as the load needs (standby replicas first, then new processes);
under `scale_down_threshold` for `scale_down_hold` seconds: down by one (drain, then standby or
stop). `decide` is a pure function of what was observed; `Autoscaler.tick` observes and acts.
New processes are placed by the control plane (tasks/control/placement.py); a scale-up that finds
no free device (or no agent) starts what fits, logs the rest once per change and counts it
(`scale_up_blocked:<reason>`). Replicas that cannot load (a misconfigured model or adapter) hold
new processes back with growing delays (tasks/control/load_backoff.py), the reason shown in the
autoscaler's state. Every decision that acts is logged, counted in Redis and shown in metrics.
With `--autoscale-policy slo` the count comes from tasks/control/slo_policy.py instead (TTFT and
ITL targets), its desired count and estimate written to the state (exported in /metrics).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, replace

import redis

from common.keys import AUTOSCALER_KEY, SCALE_COUNTERS_KEY
from common.settings import Settings
from common.states import LIVE_STATES, ReplicaState
from tasks.control.cluster import ClusterControl, ClusterError, ScaleUpBlocked
from common.model_use import last_used
from tasks.control.cold_start import evict
from tasks.control.cold_start import serving as serving_slots
from tasks.control.load_backoff import LoadBackoff
from tasks.control.placement import free_places
from tasks.control.slo_observe import SloObserver
from tasks.control.slo_policy import SloMemory, SloTargets, decide_slo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    up_threshold: float = 0.8
    down_threshold: float = 0.3
    hold_s: float = 30.0
    zero_after_s: float = 0.0  # with min_replicas 0: idle this long (no request), down to zero (0: never)

    @classmethod
    def from_settings(cls, s: Settings) -> "Policy":
        low, high = s.replica_range
        return cls(low, high, s.scale_up_threshold, s.scale_down_threshold, s.scale_down_hold, s.scale_to_zero_after)


@dataclass(frozen=True)
class Observation:
    now: float
    queued: int  # jobs in the broker's queue
    in_flight: int  # running + waiting in the replicas
    serving: int  # active + loading replicas
    capacity_per_replica: int  # batch slots of one replica
    idle_s: float = 0.0  # since the model's last request (scale to zero)

    @property
    def load(self) -> float:
        demand = self.queued + self.in_flight
        capacity = self.serving * self.capacity_per_replica
        return demand / capacity if capacity else (math.inf if demand else 0.0)


@dataclass(frozen=True)
class Memory:
    """What the autoscaler remembers between ticks."""
    low_since: float | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # up | down | hold
    count: int
    reason: str
    load: float


def scale_to_zero(obs: Observation, policy: Policy) -> Decision | None:
    """Every replica down, with --min-replicas 0, once no request came for `zero_after_s`."""
    n = obs.serving
    if n and policy.min_replicas == 0 and policy.zero_after_s and not obs.queued + obs.in_flight \
            and obs.idle_s >= policy.zero_after_s:
        return Decision("down", n, f"no request for {obs.idle_s:.0f} s: scale to zero", obs.load)
    return None


def decide(obs: Observation, policy: Policy, memory: Memory) -> tuple[Decision, Memory]:
    n, load = obs.serving, obs.load
    zero = scale_to_zero(obs, policy)
    if zero is not None:
        return zero, Memory()
    # Without a request for `zero_after_s`, the last replica stays (min_replicas 0 or not).
    floor = max(policy.min_replicas, 1)
    if n < policy.min_replicas:
        return Decision("up", policy.min_replicas - n, f"{n} serving < min {policy.min_replicas}", load), Memory()
    if n > policy.max_replicas:
        return Decision("down", n - policy.max_replicas, f"{n} serving > max {policy.max_replicas}", load), Memory()
    if load > policy.up_threshold and n < policy.max_replicas:
        needed = math.ceil((obs.queued + obs.in_flight) / (policy.up_threshold * obs.capacity_per_replica))
        count = max(1, min(needed, policy.max_replicas) - n)
        return Decision("up", count, f"load {load:.2f} > {policy.up_threshold}", load), Memory()
    if load < policy.down_threshold and n > floor:
        low_since = memory.low_since if memory.low_since is not None else obs.now
        if obs.now - low_since >= policy.hold_s:
            reason = f"load {load:.2f} < {policy.down_threshold} for {obs.now - low_since:.0f} s"
            return Decision("down", 1, reason, load), Memory()
        return Decision("hold", 0, f"load {load:.2f} low for {obs.now - low_since:.1f} s", load), replace(memory, low_since=low_since)
    return Decision("hold", 0, f"load {load:.2f}", load), Memory()


def slo_targets(s: Settings) -> SloTargets:
    """One model's SLO targets. Its floor is one replica: going to zero is scale-to-zero's call
    (no request for --scale-to-zero-after), never the SLO policy's."""
    low, high = s.replica_range
    return SloTargets(s.ttft_slo, s.itl_slo, max(low, 1), high, hold_s=s.scale_down_hold)


def pick_up(slots: dict[int, dict], count: int, slot_count: int | range, can_start: bool = True) -> list[int]:
    """Standby (or draining) replicas first, then free slots (no process, stopped or dead) when
    a host agent can start processes. `slot_count`: the slots (a model's range, or 0..count-1)."""
    own = range(slot_count) if isinstance(slot_count, int) else slot_count
    warm = [s for s, v in sorted(slots.items()) if s in own and v["state"] in (ReplicaState.STANDBY, ReplicaState.DRAINING)]
    free = [s for s in own if slots.get(s, {}).get("state") not in LIVE_STATES]
    return (warm + (free if can_start else []))[:count]


def pick_down(slots: dict[int, dict], count: int) -> list[int]:
    """The least busy active replicas, the highest slot first among equals."""
    active = [(_in_flight(v), -s, s) for s, v in slots.items() if v["state"] == ReplicaState.ACTIVE]
    return [s for _, _, s in sorted(active)[:count]]


def observe(slots: dict[int, dict], queued: int, settings: Settings, now: float, idle_s: float = 0.0) -> Observation:
    """Serving: active replicas, and loading ones that load to serve (not those loading for standby)."""
    active, loading = ReplicaState.ACTIVE, ReplicaState.LOADING
    serving = [v for v in slots.values()
               if v["state"] == active or (v["state"] == loading and v.get("target") != ReplicaState.STANDBY)]
    in_flight = sum(_in_flight(v) for v in slots.values() if v["state"] == active)
    return Observation(now, queued, in_flight, len(serving), settings.max_batch_size, idle_s)


def _in_flight(view: dict) -> int:
    return view.get("running", 0) + view.get("waiting", 0)


class Autoscaler:
    def __init__(self, settings: Settings, control: ClusterControl | None = None, backoff: LoadBackoff | None = None):
        self.settings = settings
        self.control = control or ClusterControl(settings)
        self.models = settings.catalog.models
        self.policies = {m.name: Policy.from_settings(m.settings) for m in self.models}
        self.policy = self.policies[self.models[0].name]  # the first model's (the only one's, by default)
        self.memories = {m.name: Memory() for m in self.models}
        self._started = time.time()  # a model never asked for is idle since the autoscaler started
        self._loading_seen: dict[str, float] = {}  # per model: when a replica of it was last seen loading
        self.slo = settings.autoscale_policy == "slo"
        self.slo_memories = {m.name: SloMemory() for m in self.models}
        self.slo_observers = {m.name: SloObserver(m.name) for m in self.models}
        self._desired: dict[str, int] = {}  # the SLO policy's last count per model, logged when it changes
        # Each model's own: one model that cannot load holds back only its own new replicas.
        template = backoff or LoadBackoff()
        self.backoffs = {m.name: template if m.index == 0 else LoadBackoff(template.base_s, template.cap_s)
                         for m in self.models}
        self._blocked: dict[str, str] = {}  # model -> its last scale-up block logged
        self._stop = threading.Event()

    @property
    def memory(self) -> Memory:
        return self.memories[self.models[0].name]

    @property
    def backoff(self) -> LoadBackoff:
        return self.backoffs[self.models[0].name]

    def tick(self) -> Decision:
        """Each model decided on its own replicas, queue and idle time; the first model's decision."""
        slots = self.control.slots()
        now = time.time()
        several = len(self.models) > 1
        used = last_used(self.control.redis) if several or self.policy.zero_after_s else {}
        decisions, serving, slo_state = {}, {}, {}
        for model in self.models:
            own = {s: v for s, v in slots.items() if v.get("model", model.name) == model.name} if several else slots
            self.backoffs[model.name].observe(own, now)
            if any(v.get("state") == ReplicaState.LOADING for v in own.values()):
                self._loading_seen[model.name] = now
            # Idle since its last request or its replica's start, whichever is later: a cold start
            # slower than zero_after_s must not drain the new replica as it turns active.
            idle = now - max(used.get(model.name, 0.0), self._started, self._loading_seen.get(model.name, 0.0))
            obs = observe(own, self.control.queue_size(slots, model.name if several else None), model.settings, now, idle)
            if self.slo:
                decision, slo_state[model.name] = self._decide_slo(model, own, obs)
            else:
                decision, self.memories[model.name] = decide(obs, self.policies[model.name], self.memories[model.name])
            decisions[model.name], serving[model.name] = decision, obs.serving
            if decision.action != "hold":
                self.act(decision, slots, now, model)
        first = self.models[0].name
        state = {**asdict(decisions[first]), "at": now, "serving": serving[first], "backoff": self.backoff.view(now),
                 "policy": self.settings.autoscale_policy, **slo_state.get(first, {})}
        if several:
            state["models"] = {name: {**asdict(d), "serving": serving[name], "backoff": self.backoffs[name].view(now),
                                      **slo_state.get(name, {})} for name, d in decisions.items()}
        self.control.redis.set(AUTOSCALER_KEY, json.dumps(state), ex=max(5, int(self.settings.scale_interval * 10)))
        return decisions[first]

    def _decide_slo(self, model, own: dict[int, dict], obs: Observation) -> tuple[Decision, dict]:
        """One model's SLO count as the queue policy's kind of decision (scale to zero first, as
        the queue policy has it); its inputs logged when the count changes (debug every tick)."""
        zero = scale_to_zero(obs, self.policies[model.name])
        if zero is not None:
            return zero, {}
        if not obs.serving and not obs.queued + obs.in_flight and self.policies[model.name].min_replicas == 0:
            # at zero (the idle rule's doing, or --min-replicas 0): back for the first request, not before
            return Decision("hold", 0, "no replica, no request", obs.load), {"model": model.name, "desired": 0}
        seen = self.slo_observers[model.name].observe(own, obs.queued, obs.now, model.settings.max_batch_size)
        slo, self.slo_memories[model.name] = decide_slo(seen, slo_targets(model.settings), self.slo_memories[model.name])
        logged = log.info if slo.desired != self._desired.get(model.name) else log.debug
        logged("autoscaler (slo) %s: %d → %d replicas: %s; inputs %s", model.name, slo.current, slo.desired, slo.reason,
               json.dumps({**slo.estimate, "running": seen.running, "kv_slots": seen.kv_slots,
                           "decode_step_s": round(seen.decode_step_s, 4)}))
        self._desired[model.name] = slo.desired
        decision = Decision(slo.action, abs(slo.desired - slo.current), slo.reason, obs.load)
        return decision, {"model": model.name, "desired": slo.desired, "estimate": slo.estimate}

    def act(self, decision: Decision, slots: dict[int, dict], now: float | None = None, model=None) -> None:
        """`model`: the catalog's model it is about (None: the first, the only one by default)."""
        model = model or self.models[0]
        own = {s: v for s, v in slots.items() if v.get("model", model.name) == model.name}
        # Down to no replica: their places go to other models, so the processes stop.
        to_zero = decision.action == "down" and decision.count >= len(serving_slots(own, model.name))
        if decision.action == "up":
            chosen = self._up_within_places(decision, slots, time.time() if now is None else now, model)
        else:
            chosen = pick_down(own, decision.count)
        if not chosen:
            if self._blocked.get(model.name):  # the block was logged (once per change); not again at every tick
                return
            log.info("autoscaler: %s %d wanted (%s) but no slot can", decision.action, decision.count, decision.reason)
            return
        log.info("autoscaler: scale %s stubs %s (%s)", decision.action, chosen, decision.reason)
        self.control.redis.hincrby(SCALE_COUNTERS_KEY, f"decision:{decision.action}", 1)
        try:
            if decision.action == "up":
                self.control.scale_up(chosen, trigger="autoscaler")
            elif to_zero:
                self.control.scale_down(chosen, ReplicaState.STOPPED, trigger="scale_to_zero")
            else:
                self.control.scale_down(chosen, trigger="autoscaler")
        except ScaleUpBlocked as error:  # the places went meanwhile
            self._block(model, error.reason, str(error), str(error))
        except ClusterError as error:
            log.warning("autoscaler: %s", error)

    def _up_within_places(self, decision: Decision, slots: dict[int, dict], now: float, model=None) -> list[int]:
        """Standby replicas first, then as many new processes as there are free places (none
        while replicas that cannot load hold them back); with several models, idle replicas of
        the least recently used other models are stopped to free more (tasks/control/cold_start.py);
        the rest is blocked (logged once per change, counted every time)."""
        model = model or self.models[0]
        chosen = pick_up(slots, decision.count, model.slots if len(self.models) > 1 else self.settings.slot_count)
        warm = [s for s in chosen if slots.get(s, {}).get("state") in (ReplicaState.STANDBY, ReplicaState.DRAINING)]
        new = [s for s in chosen if s not in warm]
        backoff = self.backoffs[model.name]
        if new and backoff.holds(now):
            self._block(model, "cannot_load", f"failure {backoff.failures}",
                        f"{len(new)} new replicas wanted ({decision.reason}); replicas cannot load "
                        f"({backoff.reason}); next start in {backoff.retry_at - now:.0f} s (failure {backoff.failures})")
            return warm
        fleet = self.control.fleet(slots, model.name)
        free = sum(len(places) for places in free_places(fleet).values())
        if len(new) > free and len(self.models) > 1:
            with self.control.locked():
                evict(self.control, self.control.slots(), model.name, len(new) - free, "autoscaler")
        if len(new) > free:
            reason = "no_agent" if not fleet.agents else "no_free_device"
            hosts = len(fleet.agents)
            self._block(model, reason, f"{free} free on {hosts}",
                        f"{len(new)} new replicas wanted ({decision.reason}); {free} free devices on {hosts} hosts")
            new = new[:free]
        else:
            self._blocked.pop(model.name, None)
        return warm + new

    def _block(self, model, reason: str, what: str, message: str) -> None:
        """Counted at every tick it happens; logged when `what` (the reason, the free places, the
        hosts) differs from the last block logged for `model` (each model's own)."""
        self.control.redis.hincrby(SCALE_COUNTERS_KEY, f"scale_up_blocked:{reason}", 1)
        if f"{reason}: {what}" != self._blocked.get(model.name):
            whose = f"model {model.name}: " if len(self.models) > 1 else ""
            log.warning("autoscaler: scale-up blocked (%s): %s%s", reason, whose, message)
            self._blocked[model.name] = f"{reason}: {what}"

    def run(self) -> None:
        log.info("autoscaler: replicas %d..%d, up over %.2f, down under %.2f after %.0f s",
                 self.policy.min_replicas, self.policy.max_replicas, self.policy.up_threshold,
                 self.policy.down_threshold, self.policy.hold_s)
        while not self._stop.wait(self.settings.scale_interval):
            try:
                self.tick()
            except (redis.RedisError, OSError) as error:  # Redis away for a moment: try again next tick
                log.warning("autoscaler: tick failed: %s", error)
            except Exception:  # a bug must not end the autoscaler: log it whole, try again next tick
                log.exception("autoscaler: tick failed")

    def start(self) -> "Autoscaler":
        threading.Thread(target=self.run, name="autoscaler", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
