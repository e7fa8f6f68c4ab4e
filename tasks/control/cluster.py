"""The control plane: the cluster's state and its transitions, done with Celery's remote control.

- up, for a standby (or draining) replica: `add_consumer` on the generation queue, to that worker;
- up, for a slot with no process: a start command to a host agent (`tasks.control.agent`), which starts
  `blitzscale worker --slot N` on its host; the new replica maps its weights from the host cache,
  or pulls them from the old stubs (several new ones in a chain: tasks/runtime/peer_weights.py);
- down: `cancel_consumer` to that worker; it drains (running requests finish) and becomes
  standby, or, when the slot target is `stopped`, sends Celery's `shutdown` to itself once drained.

Used by the web (`/modify_cluster_state`, `/cluster_state`) and by the autoscaler. No torch here.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass

import redis

from common.settings import Settings
from tasks.queue.celery_app import make_celery
from common.keys import (
    AUTOSCALER_KEY, CLUSTER_LOCK_KEY, GENERATION_QUEUE, SCALE_COUNTERS_KEY, SLOTS_KEY, agent_commands_key,
    agent_key_pattern, replica_key_pattern, slot_target_key,
)
from common.states import LIVE_STATES, ReplicaState
from tasks.weights.sources import store_plan

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # a slot asked to start that shows no replica after this long is dead


class ClusterError(ValueError):
    """A transition that cannot be carried out (unknown slot, already in that state, ...)."""


@dataclass(frozen=True)
class Step:
    """One planned action: `op` is add_consumer | cancel_consumer | shutdown | start."""
    op: str
    slot: int
    name: str | None = None


def merge_slots(registry: dict[int, dict], records: list[dict], now: float) -> dict[int, dict]:
    """Every slot's view: the live replica record when its heartbeat is fresh, else what the slot
    registry remembers (`stopped` after a clean exit, `loading` while a start asked by the control
    plane or made by an agent has no record yet, else `dead`)."""
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
                now - entry.get("updated_at", 0) < START_TIMEOUT_S:
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
        return read_slots(self.redis)

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

    def queue_size(self) -> int:
        return int(self.redis.llen(GENERATION_QUEUE))

    def agents(self) -> list[str]:
        return sorted(k.decode().split(":", 2)[-1] for k in self.redis.scan_iter(match=agent_key_pattern(), count=100))

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

    def _locked(self):
        return self.redis.lock(CLUSTER_LOCK_KEY, timeout=30, blocking_timeout=10)

    def _scale_up(self, new_slots: list[int], sources: list[int], trigger: str) -> list[Step]:
        slots = self.slots()
        self._check_slots(new_slots)
        for source in sources:
            if slots.get(source, {}).get("state") not in LIVE_STATES:
                raise ClusterError(f"old stub {source} is not a live replica")
        steps = [self._plan_up(slot, slots.get(slot)) for slot in new_slots]
        # Where each new process takes its weights from: the old stubs, chained (tasks/weights/sources.py).
        store_plan(self.redis, [step.slot for step in steps if step.op == "start"], list(sources))
        self._apply(steps, ReplicaState.ACTIVE)
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
        if not self.agents():
            raise ClusterError(f"stub {slot} has no process and no host agent runs to start one "
                               "(run `blitzscale agent`, or `blitzscale serve`)")
        return Step("start", slot)

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

    def _apply(self, steps: list[Step], target: str) -> None:
        for step in steps:
            self.redis.set(slot_target_key(step.slot), target)
            log.info("stub %d: %s%s", step.slot, step.op, f" → {step.name}" if step.name else "")
            if step.op == "start":
                self._start(step.slot)
            elif step.op == "shutdown":
                self.celery.control.shutdown(destination=[step.name])
            else:
                self._consumer_control(step)

    def _consumer_control(self, step: Step) -> None:
        control = getattr(self.celery.control, step.op)
        replies = control(GENERATION_QUEUE, destination=[step.name], reply=True, timeout=2.0)
        if not any(step.name in reply for reply in replies or []):
            raise ClusterError(f"stub {step.slot}: {step.name} did not answer {step.op}")

    def _start(self, slot: int) -> None:
        agents = self.agents()
        host = socket.gethostname() if socket.gethostname() in agents else agents[0]
        entry = {"slot": slot, "host": host, "state": ReplicaState.LOADING, "by": "control", "updated_at": time.time()}
        pipe = self.redis.pipeline()
        pipe.hset(SLOTS_KEY, str(slot), json.dumps(entry))
        pipe.rpush(agent_commands_key(host), json.dumps({"op": "start", "slot": slot}))
        pipe.execute()

    def _count(self, name: str) -> None:
        self.redis.hincrby(SCALE_COUNTERS_KEY, name, 1)


def read_slots(connection: redis.Redis) -> dict[int, dict]:
    """Every known slot's view (`merge_slots`), with the target it was last given."""
    keys = list(connection.scan_iter(match=replica_key_pattern(), count=100))
    records = [json.loads(r) for r in (connection.mget(keys) if keys else []) if r]
    registry = {int(k): json.loads(v) for k, v in connection.hgetall(SLOTS_KEY).items()}
    slots = merge_slots(registry, records, time.time())
    ordered = sorted(slots)
    targets = connection.mget([slot_target_key(s) for s in ordered]) if ordered else []
    for slot, target in zip(ordered, targets):
        slots[slot]["target"] = target.decode() if target else None
    return slots


def read_counters(connection: redis.Redis) -> dict[str, int]:
    """Scaling counters: `scale_up:<trigger>:<standby|process>`, `scale_down:<trigger>:<target>`,
    `decision:<up|down>`."""
    return {k.decode(): int(v) for k, v in connection.hgetall(SCALE_COUNTERS_KEY).items()}
