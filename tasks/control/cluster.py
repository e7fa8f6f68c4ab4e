"""The control plane: the cluster's state and its transitions, done with Celery's remote control.

- up, for a standby (or draining) replica: `add_consumer` on the generation queue, to that worker;
- up, for a slot with no process: placed first (which host, which device, fetched from whom:
  tasks/control/placement.py), then a start command to that host's agent (`tasks.control.agent`),
  which starts `blitzscale worker --slot N` on that device; the new replica maps its weights from
  the host cache, or pulls them from the placement's peers (a chain across hosts:
  tasks/runtime/peer_weights.py);
- down: `cancel_consumer` to that worker; it drains (running requests finish) and becomes
  standby, or, when the slot target is `stopped`, sends Celery's `shutdown` to itself once drained.

Used by the web (`/modify_cluster_state`, `/cluster_state`) and by the autoscaler. No torch here.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import redis

from common.fleet import AgentRecord, Placement, StartCommand, read_agents
from common.keys import (
    AUTOSCALER_KEY, CLUSTER_LOCK_KEY, PLACEMENT_KEY, SCALE_COUNTERS_KEY, SLOTS_KEY,
    agent_commands_key, slot_target_key,
)
from common.replica_records import live_records
from common.settings import Settings
from common.slot_leases import CLAIM_TTL_S, CONTROL_OWNER, claim, stale_holders, undo_claim
from common.states import LIVE_STATES, ReplicaState
from tasks.control.placement import Fleet, NoFreePlace, place
from tasks.queue.celery_app import make_celery
from tasks.queue.depth import queued_jobs
from tasks.weights.sources import store_sources

log = logging.getLogger(__name__)

START_TIMEOUT_S = float(CLAIM_TTL_S)  # a slot asked to start that shows no replica after this long is dead


class ClusterError(ValueError):
    """A transition that cannot be carried out (unknown slot, already in that state, ...)."""


class ScaleUpBlocked(ClusterError):
    """New replicas that have nowhere to go: `reason` is `no_agent` or `no_free_device`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Step:
    """One planned action: `op` is add_consumer | cancel_consumer | shutdown | start."""
    op: str
    slot: int
    name: str | None = None


def merge_slots(registry: dict[int, dict], records: list[dict], now: float,
                hosts: set[str] | None = None) -> dict[int, dict]:
    """Every slot's view: the live replica record when its heartbeat is fresh, else what the slot
    registry remembers (`stopped` after a clean exit, `loading` while a start asked by the control
    plane or made by an agent has no record yet and that host's agent is there, else `dead`).
    `hosts`: the hosts whose agent is present (None: not checked)."""
    live = {int(r["slot"]): r for r in records if r.get("slot") is not None}
    slots = {}
    for slot in sorted(set(registry) | set(live)):
        if slot in live:
            slots[slot] = {**live[slot], "alive": True}
            continue
        entry = registry[slot]
        state = entry.get("state")
        if state == ReplicaState.STOPPED:
            pass
        elif state == ReplicaState.LOADING and entry.get("by") in ("control", "agent") and \
                now - entry.get("updated_at", 0) < START_TIMEOUT_S and (hosts is None or entry.get("host") in hosts):
            pass
        else:
            state = ReplicaState.DEAD
        slots[slot] = {**entry, "state": state, "alive": False, "running": 0, "waiting": 0}
    return slots


class ClusterControl:
    def __init__(self, settings: Settings, connection: redis.Redis | None = None, celery=None):
        self.settings = settings
        self.redis = connection or redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.celery = celery or make_celery(settings)

    # -- reading

    def slots(self) -> dict[int, dict]:
        """Every slot's view, with the model its replica serves (its slot's: common/models.py)."""
        slots = read_slots(self.redis)
        for slot, view in slots.items():
            view["model"] = self.settings.catalog.for_slot(slot).name
        return slots

    def hosts(self) -> list[AgentRecord]:
        """Every present host agent's record, by host name."""
        return read_agents(self.redis)

    def fleet(self, slots: dict[int, dict] | None = None, model: str | None = None) -> Fleet:
        """What placement reads: the agents, the slots, and the model their replicas load
        (`model`'s, with several models: the agents advertise the first model's only)."""
        slots = self.slots() if slots is None else slots
        agents = self.hosts()
        first = self.settings.catalog.first.name
        shas = Counter(v["model_sha"] for v in slots.values() if v.get("alive") and v.get("model_sha")
                       and v.get("model", first) == (model or first))
        sha = shas.most_common(1)[0][0] if shas else next(
            (a.model_sha for a in agents if a.model_sha and (model or first) == first), None)
        return Fleet(agents, slots, sha)

    def placement(self) -> dict | None:
        """The last placement computed and executed (a scale-up that started processes)."""
        raw = self.redis.get(PLACEMENT_KEY)
        return json.loads(raw) if raw else None

    def celery_view(self, names: list[str], timeout: float = 1.0) -> dict[str, dict]:
        """What Celery itself reports for these workers: the queues each consumes (`inspect
        active_queues`) and its pid (`inspect stats`). A worker that does not answer is absent."""
        if not names:
            return {}
        inspect = self.celery.control.inspect(destination=names, timeout=timeout, limit=len(names))
        queues = inspect.active_queues() or {}
        stats = self.celery.control.inspect(destination=list(queues) or names, timeout=timeout,
                                            limit=len(queues) or len(names)).stats() or {}
        return {name: {"queues": [q["name"] for q in qs], "pid": (stats.get(name) or {}).get("pid")}
                for name, qs in queues.items()}

    def state_counts(self, slots: dict[int, dict] | None = None) -> dict[str, int]:
        slots = self.slots() if slots is None else slots
        counts = dict.fromkeys(ReplicaState, 0)
        for view in slots.values():
            counts[view["state"]] = counts.get(view["state"], 0) + 1
        return counts

    def queue_size(self, slots: dict[int, dict] | None = None, model: str | None = None) -> int:
        """Jobs waiting in the shared queues and in the live replicas' own queues (`model`'s only)."""
        slots = self.slots() if slots is None else slots
        models = [m for m in self.settings.catalog.models if model is None or m.name == model]
        return queued_jobs(self.redis, [v["name"] for v in slots.values() if v.get("alive") and v.get("name")
                                        and (model is None or v.get("model") == model)], [m.queue for m in models])

    def agents(self) -> list[str]:
        return [agent.host for agent in self.hosts()]

    def autoscaler_state(self) -> dict | None:
        raw = self.redis.get(AUTOSCALER_KEY)
        return json.loads(raw) if raw else None

    def counters(self) -> dict[str, int]:
        return read_counters(self.redis)

    # -- transitions

    def scale_up(self, new_slots: list[int], sources: list[int] = (), trigger: str = "manual") -> list[Step]:
        with self._locked():
            return self._scale_up(new_slots, sources, trigger)

    def scale_down(self, slots_down: list[int], target: str | None = None, trigger: str = "manual") -> list[Step]:
        with self._locked():
            return self._scale_down(slots_down, target, trigger)

    def locked(self):
        """The cluster lock: one scaling command plans and applies its steps at a time."""
        return self.redis.lock(CLUSTER_LOCK_KEY, timeout=30, blocking_timeout=10)

    _locked = locked

    def scale_up_locked(self, new_slots: list[int], trigger: str) -> list[Step]:
        """`scale_up`, for a caller that holds `locked()` already (tasks/control/cold_start.py)."""
        return self._scale_up(new_slots, [], trigger)

    def scale_down_locked(self, slots_down: list[int], target: str, trigger: str) -> list[Step]:
        return self._scale_down(slots_down, target, trigger)

    def _scale_up(self, new_slots: list[int], sources: list[int], trigger: str) -> list[Step]:
        slots = self.slots()
        self._check_slots(new_slots)
        for source in sources:
            if slots.get(source, {}).get("state") not in LIVE_STATES:
                raise ClusterError(f"old stub {source} is not a live replica")
        steps = [self._plan_up(slot, slots.get(slot)) for slot in new_slots]
        starts = [step.slot for step in steps if step.op == "start"]
        placements = {p.slot: p for p in self._place(starts, slots, list(sources))} if starts else {}
        self._claim_all(placements, slots)
        # Where each new process takes its weights from (tasks/weights/sources.py).
        store_sources(self.redis, {slot: list(p.fetch_from) for slot, p in placements.items()})
        self._apply(steps, ReplicaState.ACTIVE, placements)
        if placements:
            self._record_placement(list(placements.values()), trigger)
        for step in steps:
            self._count(f"scale_up:{trigger}:{'standby' if step.op == 'add_consumer' else 'process'}")
        return steps

    def _scale_down(self, slots_down: list[int], target: str | None, trigger: str) -> list[Step]:
        target = target or self.down_target()
        slots = self.slots()
        self._check_slots(slots_down)
        steps = [self._plan_down(slot, slots.get(slot), target) for slot in slots_down]
        self._apply(steps, target)
        for _ in steps:
            self._count(f"scale_down:{trigger}:{target}")
        return steps

    def down_target(self) -> str:
        return ReplicaState.STOPPED if self.settings.down_target == "stop" else ReplicaState.STANDBY

    def _check_slots(self, slots: list[int]) -> None:
        if not slots:
            raise ClusterError("no stub index given")
        if len(set(slots)) != len(slots):
            raise ClusterError("a stub index is given twice")
        limit = self.settings.slot_count
        for slot in slots:
            if not 0 <= slot < limit:
                raise ClusterError(f"unknown stub index {slot}: slots are 0..{limit - 1} (--max-replicas)")

    def _plan_up(self, slot: int, view: dict | None) -> Step:
        state = (view or {}).get("state")
        if state in (ReplicaState.ACTIVE, ReplicaState.LOADING):
            raise ClusterError(f"stub {slot} is already {state}")
        if state in (ReplicaState.STANDBY, ReplicaState.DRAINING):
            return Step("add_consumer", slot, view["name"])
        return Step("start", slot)

    def _place(self, new_slots: list[int], slots: dict[int, dict], sources: list[int]) -> list[Placement]:
        fleet = self.fleet(slots, self.settings.catalog.for_slot(new_slots[0]).name)
        stubs = f"stub{'s' if len(new_slots) > 1 else ''} {', '.join(map(str, new_slots))}"
        if not fleet.agents:
            raise ScaleUpBlocked("no_agent", f"{stubs} {'have' if len(new_slots) > 1 else 'has'} no process and no "
                                 "host agent runs to start one (run `blitzscale agent`, or `blitzscale serve`)")
        try:
            return place(new_slots, fleet, sources)
        except NoFreePlace as error:
            raise ScaleUpBlocked("no_free_device", f"{stubs} cannot start: {error}") from error

    def _plan_down(self, slot: int, view: dict | None, target: str) -> Step:
        state = (view or {}).get("state")
        if state == ReplicaState.ACTIVE:
            return Step("cancel_consumer", slot, view["name"])
        if state == ReplicaState.STANDBY and target == ReplicaState.STOPPED:
            return Step("shutdown", slot, view["name"])
        if state in (ReplicaState.STANDBY, ReplicaState.DRAINING):
            raise ClusterError(f"stub {slot} is already {state}")
        if state == ReplicaState.LOADING:
            raise ClusterError(f"stub {slot} is still loading; scale it down once it is active")
        raise ClusterError(f"stub {slot} has no running replica ({state or 'never started'})")

    def _apply(self, steps: list[Step], target: str, placements: dict[int, Placement] | None = None) -> None:
        for step in steps:
            self.redis.set(slot_target_key(step.slot), target)
            log.info("stub %d: %s%s", step.slot, step.op, f" → {step.name}" if step.name else "")
            if step.op == "start":
                self._start(placements[step.slot])
            elif step.op == "shutdown":
                self.celery.control.shutdown(destination=[step.name])
            else:
                self._consumer_control(step)

    def _consumer_control(self, step: Step) -> None:
        control = getattr(self.celery.control, step.op)
        queue = self.settings.catalog.for_slot(step.slot).queue  # its model's shared queue
        replies = control(queue, destination=[step.name], reply=True, timeout=2.0)
        if not any(step.name in reply for reply in replies or []):
            raise ClusterError(f"stub {step.slot}: {step.name} did not answer {step.op}")

    def _claim_all(self, placements: dict[int, Placement], slots: dict[int, dict]) -> None:
        """Every start's slot lease (common/slot_leases.py), or none: a slot that an agent took
        meanwhile is not started twice. Each lease is taken with the slot's `loading` entry on its
        host and device in one atomic step: the next placement sees the device taken, and an agent
        allocating between two of these steps sees the slot held (with its old `stopped` or `dead`
        entry, the control plane's own lease would read as a stale holder's, free to take).
        Undone, the slots get their previous entries back (a refused command leaves none behind)."""
        previous = dict(zip(placements, self.redis.hmget(SLOTS_KEY, [str(s) for s in placements]))) if placements else {}
        claimed = []
        for slot, placement in placements.items():
            entry = {"slot": slot, "host": placement.host, "device": placement.device, "state": ReplicaState.LOADING,
                     "by": "control", "updated_at": time.time(), "placement": placement.to_dict(),
                     "model": self.settings.catalog.for_slot(slot).name}
            if not claim(self.redis, slot, CONTROL_OWNER, entry, stale=stale_holders(slots.get(slot))):
                for taken in claimed:
                    undo_claim(self.redis, taken, CONTROL_OWNER, previous[taken])
                raise ClusterError(f"stub {slot} was just taken by another start")
            claimed.append(slot)

    def _start(self, placement: Placement) -> None:
        """The host's agent gets the start command (its slot is claimed: `_claim_all`)."""
        log.info("stub %d: placed on %s %s (weights: %s%s)", placement.slot, placement.host, placement.device,
                 placement.weights, f" from stubs {list(placement.fetch_from)}" if placement.fetch_from else "")
        self.redis.rpush(agent_commands_key(placement.host), StartCommand(placement.slot, placement.device).to_json())

    def _record_placement(self, placements: list[Placement], trigger: str) -> None:
        self.redis.set(PLACEMENT_KEY, json.dumps({"at": time.time(), "trigger": trigger,
                                                  "placements": [p.to_dict() for p in placements]}))

    def _count(self, name: str) -> None:
        self.redis.hincrby(SCALE_COUNTERS_KEY, name, 1)


def read_slots(connection: redis.Redis) -> dict[int, dict]:
    """Every known slot's view (`merge_slots`), with the target it was last given."""
    records = live_records(connection)
    registry = {int(k): json.loads(v) for k, v in connection.hgetall(SLOTS_KEY).items()}
    hosts = {agent.host for agent in read_agents(connection)}
    slots = merge_slots(registry, records, time.time(), hosts)
    ordered = sorted(slots)
    targets = connection.mget([slot_target_key(s) for s in ordered]) if ordered else []
    for slot, target in zip(ordered, targets):
        slots[slot]["target"] = target.decode() if target else None
    return slots


def read_counters(connection: redis.Redis) -> dict[str, int]:
    """Scaling counters: `scale_up:<trigger>:<standby|process>`, `scale_down:<trigger>:<target>`,
    `decision:<up|down>`, `scale_up_blocked:<reason>`, `replica_start:<preboot|fresh>` (host agents)."""
    return {k.decode(): int(v) for k, v in connection.hgetall(SCALE_COUNTERS_KEY).items()}
