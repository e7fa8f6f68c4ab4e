"""A model with no replica gets one for its first request, at once (docs/models.md).

The web calls `ensure_replica` when a request's model has no serving replica: a standby replica of
the model is activated, else a new one is placed on a free place, else the least-recently-used
idle model's replica is stopped to make room (`evictable`: never one with running, waiting or
queued work, nor one its model's `--min-replicas` keeps) and the request waits in its queue until
the place is free (the autoscaler places the model then). Every place busy: the request waits
too, and the autoscaler evicts the first replica that goes idle. When no place can ever be freed
(each held by its model's minimum), `NoPlace` names what holds every place. The autoscaler uses the same eviction when it scales a
model up and the places are taken. No torch here.
"""
from __future__ import annotations

import logging
import time

from common.model_use import last_used
from common.slot_leases import load_failure
from common.states import LIVE_STATES, ReplicaState
from tasks.control.cluster import ClusterControl, ClusterError
from tasks.control.load_backoff import LoadBackoff
from tasks.control.placement import free_places, used_places

log = logging.getLogger(__name__)

SERVING = (ReplicaState.ACTIVE, ReplicaState.LOADING)
# A model whose replica could not load this recently is not started again for a request (the
# first request after it tries again; the autoscaler keeps its own growing backoff).
LOAD_RETRY_S = LoadBackoff.base_s


class NoPlace(ClusterError):
    """Every place holds a replica that cannot be stopped now."""


def serving(slots: dict[int, dict], model: str) -> list[int]:
    """Slots of `model` whose replica serves or is loading to serve."""
    return [s for s, v in slots.items() if v.get("model", model) == model and v["state"] in SERVING
            and not (v["state"] == ReplicaState.LOADING and v.get("target") == ReplicaState.STANDBY)]


def evictable(control: ClusterControl, slots: dict[int, dict], model: str, used: dict[str, float],
              busy_too: bool = False) -> list[int]:
    """Replicas of other models that may be stopped to free a place, least recently used first:
    idle (nothing running or waiting in it, nothing queued for its model; `busy_too`: or not),
    not already on its way out, and above its model's `--min-replicas`."""
    catalog = control.settings.catalog
    candidates = []
    for other in catalog.models:
        if other.name == model:
            continue
        own = {s: v for s, v in slots.items() if v.get("model") == other.name and v["state"] in LIVE_STATES}
        leaving = [s for s, v in own.items() if v.get("target") == ReplicaState.STOPPED]
        idle = [s for s, v in own.items() if s not in leaving and (busy_too or (
                v["state"] in (ReplicaState.ACTIVE, ReplicaState.STANDBY) and v.get("alive")
                and not v.get("running") and not v.get("waiting")))]
        if not idle or (not busy_too and control.queue_size(slots, other.name)):
            continue
        spare = len(own) - len(leaving) - other.settings.min_replicas
        # the standby ones first (they serve nothing), then the highest slot
        idle.sort(key=lambda s: (own[s]["state"] != ReplicaState.STANDBY, -s))
        candidates += [(used.get(other.name, 0.0), s) for s in idle[:max(0, spare)]]
    return [s for _, s in sorted(candidates)]


def leaving(slots: dict[int, dict], model: str) -> list[int]:
    """Replicas of other models told to stop and still holding their places (an eviction under way)."""
    return [s for s, v in slots.items() if v.get("model") != model and v["state"] in LIVE_STATES
            and v.get("target") == ReplicaState.STOPPED]


def holders(control: ClusterControl, slots: dict[int, dict]) -> str:
    """What holds every place: `h0 cpu:0: a (stub 0, active, 1 running)`, ..."""
    parts = []
    for (host, device), slot in sorted(used_places(control.fleet(slots)).items()):
        view = slots.get(slot, {}) if slot is not None else {}
        busy = f", {view.get('running', 0)} running, {view.get('waiting', 0)} waiting" if view.get("alive") else ""
        parts.append(f"{host} {device}: {view.get('model', '?')} (stub {slot}, {view.get('state', '?')}{busy})")
    return "; ".join(parts) or "no host agent runs"


def evict(control: ClusterControl, slots: dict[int, dict], model: str, count: int, trigger: str) -> list[int]:
    """Stop up to `count` LRU idle replicas of other models (minus evictions already under way)
    for `model`; the stopped slots. Caller holds the cluster lock."""
    wanted = count - len(leaving(slots, model))
    if wanted <= 0:
        return []
    victims = evictable(control, slots, model, last_used(control.redis))[:wanted]
    for slot in victims:
        log.info("stub %d (%s) stopped to free a place for %s (least recently used, idle)",
                 slot, slots[slot].get("model"), model)
        control.scale_down_locked([slot], ReplicaState.STOPPED, trigger=f"evict:{trigger}")
    return victims


def ensure_replica(control: ClusterControl, model: str, trigger: str = "request") -> str:
    """One replica of `model` serving or on its way, at once: `serving`, `activated`, `started`,
    `evicting` (a place is being freed: the autoscaler places it once free) or `waiting` (every
    place is busy now, the autoscaler evicts the first that goes idle; or the model's replica
    still loads for standby, the autoscaler activates it once loaded). Raises NoPlace naming
    what holds every place when none can ever be freed (each held by its model's minimum)."""
    served = control.settings.catalog.get(model)
    with control.locked():
        slots = control.slots()
        if serving(slots, model):
            return "serving"
        warm = [s for s in served.slots if slots.get(s, {}).get("state") in (ReplicaState.STANDBY, ReplicaState.DRAINING)]
        if warm:
            control.scale_up_locked(warm[:1], trigger=f"cold_start:{trigger}")
            return "activated"
        failed = load_failure({s: slots[s] for s in served.slots if s in slots}, time.time() - LOAD_RETRY_S)
        if failed:  # a new process would fail the same way (and might evict a healthy model's for it)
            raise NoPlace(f"model {model}: {failed}; not started again for {LOAD_RETRY_S:g} s")
        free_slots = [s for s in served.slots if slots.get(s, {}).get("state") not in LIVE_STATES]
        if not served.slots:
            raise NoPlace(f"model {model} has no replica slot (--max-replicas, --num-replicas)")
        if not free_slots:  # each slot's replica is live, none serving: loading for standby
            return "waiting"  # once loaded, the autoscaler activates it for the queued request
        if sum(len(p) for p in free_places(control.fleet(slots, model)).values()):
            control.scale_up_locked(free_slots[:1], trigger=f"cold_start:{trigger}")
            return "started"
        if leaving(slots, model) or evict(control, slots, model, 1, trigger):
            return "evicting"
        if evictable(control, slots, model, {}, busy_too=True):
            return "waiting"
        raise NoPlace(f"no place for a replica of model {model}, and none can be freed: {holders(control, slots)}")
