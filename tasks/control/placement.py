"""Placement: where each new replica of a scale-up goes, computed as a plain value before anything
starts (as BlitzScale's planner computes a plan, then executes it). `place()` is a pure function
of what the agents and the replicas advertise; `ClusterControl` executes its result and
`/cluster_state` shows it.

For each new replica, in the command's order, a free place (one replica per GPU or CPU place) on
the best host:

1. a host whose host cache holds the model (nothing to copy);
2. a host that can copy it from a live peer: a replica holding the model, or one placed earlier by
   this command on another host, so that the new replicas form one chain across hosts, each host
   fetching from the previous one (docs/peer-weights.md);
3. any host (the model is prepared from its source there).

Ties go to the host with the fewest replicas (spread), then by name; the place is the host's
lowest free one. A second replica on a host maps the host's copy (`host-cache`), with the first
one's sources: the replicas of a host share one cache entry, and whichever takes its lock first
makes the copy. No torch, no Redis here.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from common.fleet import AgentRecord, Placement
from common.states import LIVE_STATES

HOST_CACHE, PEER, SOURCE = "host-cache", "peer", "source"
HOLDING = ("complete", "fetching", "indexing")  # a replica's weights state: it has (or is getting) the model


class NoFreePlace(ValueError):
    """Fewer free places than new replicas: nothing is placed."""

    def __init__(self, wanted: int, free: int, in_use: dict[tuple[str, str], int | None]):
        self.wanted, self.free, self.in_use = wanted, free, len(in_use)
        held = ", ".join(f"{host} {device}" + (f" (stub {slot})" if slot is not None else "")
                         for (host, device), slot in sorted(in_use.items()))
        super().__init__(f"no free device for {wanted} new replica{'s' if wanted > 1 else ''}: {free} free, "
                         f"{len(in_use)} in use" + (f" ({held})" if held else ""))


@dataclass(frozen=True)
class Fleet:
    """What placement reads: the agents' records, every slot's view (`read_slots`), the model."""
    agents: list[AgentRecord]
    slots: dict[int, dict]
    model_sha: str | None = None


def place(new_slots: list[int], fleet: Fleet, sources: list[int] = ()) -> list[Placement]:
    """A placement for each of `new_slots`; `sources` are the command's old stubs (copied from
    first). Raises NoFreePlace when there are fewer free places than new replicas."""
    free = free_places(fleet)
    free_count = sum(len(places) for places in free.values())
    if free_count < len(new_slots):
        raise NoFreePlace(len(new_slots), free_count, used_places(fleet))
    agents = {agent.host: agent for agent in fleet.agents}
    load = Counter(view.get("host") for view in fleet.slots.values() if view["state"] in LIVE_STATES)
    plan: list[Placement] = []
    for slot in new_slots:
        tiers = {host: _tier(agents[host], fleet, plan) for host, places in free.items() if places}
        host = min(tiers, key=lambda h: (tiers[h], load[h], h))
        plan.append(_placement(slot, agents[host], free[host].pop(0), tiers[host], fleet, plan, list(sources)))
        load[host] += 1
    return plan


def used_places(fleet: Fleet) -> dict[tuple[str, str], int | None]:
    """(host, place) → the slot holding it: as its agent reports, or as a live slot names it (a
    start on its way, which the agent does not report yet)."""
    hosts = {agent.host for agent in fleet.agents}
    used = {(agent.host, p.name): p.slot for agent in fleet.agents for p in agent.places if p.slot is not None}
    for slot, view in fleet.slots.items():
        key = (view.get("host"), view.get("device"))
        if view["state"] in LIVE_STATES and key[0] in hosts:
            used.setdefault(key, slot)
    return used


def free_places(fleet: Fleet) -> dict[str, list[str]]:
    """Each host's free places, lowest index first (GPUs before CPU places)."""
    used = used_places(fleet)
    return {agent.host: [p.name for p in sorted(agent.places, key=lambda p: (p.kind != "cuda", p.index))
                         if (agent.host, p.name) not in used]
            for agent in fleet.agents}


def holders(fleet: Fleet) -> list[dict]:
    """Live replicas that hold the model or are receiving it, the most useful first."""
    out = [view for view in fleet.slots.values()
           if view.get("alive") and (view.get("weights") or {}).get("sha") == fleet.model_sha
           and fleet.model_sha and view["weights"].get("state") in HOLDING and view["weights"].get("addr")]
    return sorted(out, key=lambda v: (v["weights"]["state"] != "complete", v["state"] != "active", v["slot"]))


def reachable(peer_addr: str | None, host_addr: str | None) -> bool:
    """A data plane on a loopback address serves its own machine only: hosts simulated on one
    machine (all on loopback) reach each other; a host on a real address does not reach it."""
    return not _loopback(peer_addr) or _loopback(host_addr)


def _tier(agent: AgentRecord, fleet: Fleet, plan: list[Placement]) -> int:
    if agent.holds_model(fleet.model_sha) or any(
            v.get("host") == agent.host and v["weights"]["state"] == "complete" for v in holders(fleet)):
        return 0
    return 1 if _peers_for(agent, fleet, plan) else 2


def _peers_for(agent: AgentRecord, fleet: Fleet, plan: list[Placement]) -> list[int]:
    """Slots this host could copy from: the chain's predecessor (the last placement of this plan on
    another host), then the live replicas holding the model, if reachable."""
    agents = {a.host: a for a in fleet.agents}
    before = [p for p in plan if p.host != agent.host
              and reachable(agents[p.host].weights_host if p.host in agents else None, agent.weights_host)]
    chain = [before[-1].slot] if before else []
    live = [v["slot"] for v in holders(fleet)
            if v.get("host") != agent.host and reachable(v["weights"]["addr"], agent.weights_host)]
    return chain + live


def _placement(slot: int, agent: AgentRecord, device: str, tier: int, fleet: Fleet, plan: list[Placement],
               sources: list[int]) -> Placement:
    if tier == 0:
        return Placement(slot, agent.host, device, HOST_CACHE)
    here = next((p for p in plan if p.host == agent.host), None)
    if here is not None:  # maps the host's copy; whichever of them takes the cache entry first copies it
        return Placement(slot, agent.host, device, HOST_CACHE, here.fetch_from)
    peers = _peers_for(agent, fleet, plan)
    chain = [p for p in peers if any(q.slot == p for q in plan)]
    fetch_from = tuple(dict.fromkeys(chain + sources + peers))  # predecessor, old stubs, holders
    return Placement(slot, agent.host, device, PEER if peers else SOURCE, fetch_from)


def _loopback(addr: str | None) -> bool:
    host = (urlsplit(addr).hostname if addr and "://" in addr else addr) or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
