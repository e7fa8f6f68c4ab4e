"""Replica slots, allocated cluster-wide.

A slot is held by whoever holds its lease (`common.keys.slot_lease_key`): a starter (host agent,
control plane, `worker --slot auto`) takes it atomically before it starts anything (an agent
writes the slot's `loading` entry in the same step), and the replica then renews it with every heartbeat
(tasks/runtime/lifecycle.py). Two starters asking at the same moment get two slots: two agents
never both start slot 0. A lease ends with a clean stop, when its holder's heartbeat stops
(expiry), or at once when the agent sees its child exit before it ever served (`release`).
A replica whose record expired shows `dead`, and its slot may go to another start at once; if it
was only late, its next heartbeat finds the lease taken and it drains and exits (`renew`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from common.keys import SLOTS_KEY, slot_lease_key
from common.states import LIVE_STATES

CLAIM_TTL_S = 300  # a claimed slot whose replica never heartbeats is free again after this long

CONTROL_OWNER = "control"  # the control plane's claims (tasks/control/cluster.py)

# KEYS: lease, slot registry. ARGV: owner, ttl, slot, entry JSON ('' none), then the stale holders
# that may be replaced. Free, or held by a stale holder: take it (and write the entry).
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local stale = false
  for i = 5, #ARGV do
    if holder == ARGV[i] then stale = true end
  end
  if not stale then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) end
return 1
"""

# KEYS: lease. ARGV: the holders whose lease this is. Deleted only if one of them holds it.
_RELEASE = """
local holder = redis.call('GET', KEYS[1])
for _, owner in ipairs(ARGV) do
  if holder == owner then return redis.call('DEL', KEYS[1]) end
end
return 0
"""


# KEYS: lease, slot registry. ARGV: replica name, ttl ('0': end the lease), slot, entry JSON, '1' to take the
# lease whoever holds it. A replica's heartbeat: its lease and entry, unless another start holds the slot now.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if ARGV[5] ~= '1' and holder and holder ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2])) end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""


# KEYS: lease, slot registry. ARGV: owner, slot, the entry to put back ('' none). Only while owner holds it.
_UNDO = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] == '' then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
return 1
"""


class NoFreeSlot(RuntimeError):
    """Every candidate slot is held."""


def agent_owner(host: str) -> str:
    """A host agent's claims (`blitzscale agent --replicas/--standby-replicas`)."""
    return f"agent:{host}"


def stale_holders(view: dict | None) -> tuple[str, ...]:
    """Who may still hold the lease of a slot that the cluster view shows dead or stopped (a
    replica or a start that is gone, whose lease has not expired yet): they may be replaced."""
    if not view or view.get("state") in LIVE_STATES:
        return ()
    holders = [CONTROL_OWNER] + ([view["name"]] if view.get("name") else [])
    return tuple(holders + ([agent_owner(view["host"])] if view.get("host") else []))


def claim(connection: redis.Redis, slot: int, owner: str, entry: dict | None = None,
          stale: Iterable[str] = (), ttl: int = CLAIM_TTL_S) -> bool:
    """Take `slot` if nobody holds it (or only one of the `stale` holders); with `entry`, write it
    as the slot's registry entry in the same atomic step."""
    return bool(connection.eval(_CLAIM, 2, slot_lease_key(slot), SLOTS_KEY, owner, int(ttl), str(slot),
                                json.dumps(entry) if entry is not None else "", *stale))


def allocate(connection: redis.Redis, views: dict[int, dict], owner: str, entry: dict | None = None,
             limit: int = 1024, ttl: int = CLAIM_TTL_S, slots: range | None = None) -> int:
    """The lowest slot (of `slots`: a model's range; default 0..limit-1) that the cluster view
    (`views`: slot -> its view) shows free and this call could take (see `claim`)."""
    for slot in range(limit) if slots is None else slots:
        view = views.get(slot)
        if view is not None and view.get("state") in LIVE_STATES:
            continue
        if claim(connection, slot, owner, {**entry, "slot": slot} if entry is not None else None,
                 stale_holders(view), ttl):
            return slot
    raise NoFreeSlot(f"no free replica slot below {limit}" if slots is None else
                     f"no free replica slot in {slots.start}..{slots.stop - 1}")


def release(connection: redis.Redis, slot: int, *holders: str) -> bool:
    """End `slot`'s lease if one of `holders` holds it (never someone else's)."""
    return bool(connection.eval(_RELEASE, 1, slot_lease_key(slot), *holders))


def renew(connection: redis.Redis, slot: int, name: str, entry: dict, ttl: int, take: bool = False) -> bool:
    """A replica's heartbeat: hold `slot`'s lease as `name` for `ttl` seconds (0: end it) and write
    its registry entry, unless someone else holds the lease (False). `take`: whoever holds it, for
    a replica's first heartbeat (its starter's claim was made for it). A replica whose record
    expired shows `dead` and its slot may go to another start (`stale_holders`); back from a late
    heartbeat, it must not take that slot back (two replicas on one slot)."""
    return bool(connection.eval(_RENEW, 2, slot_lease_key(slot), SLOTS_KEY, name, int(ttl), str(slot),
                                json.dumps(entry), "1" if take else "0"))


def undo_claim(connection: redis.Redis, slot: int, owner: str, previous: bytes | str | None) -> bool:
    """End `owner`'s claim of `slot` and put back the registry entry it replaced (`previous`,
    raw; None: none), in one step: never someone else's lease or entry."""
    return bool(connection.eval(_UNDO, 2, slot_lease_key(slot), SLOTS_KEY, owner, str(slot), previous or ""))


def registry_entries(connection: redis.Redis, slots: Iterable[int]) -> dict[int, dict]:
    """What the starters and replicas of `slots` last wrote in the registry (no live records)."""
    slots = list(slots)
    raw = connection.hmget(SLOTS_KEY, [str(s) for s in slots]) if slots else []
    return {slot: json.loads(entry) for slot, entry in zip(slots, raw) if entry}


def load_failure(slots: dict[int, dict], since: float) -> str | None:
    """The reason of a slot that could not load after `since` (a timestamp), if any."""
    for _, view in sorted(slots.items()):
        if view.get("cannot_load") and view.get("updated_at", 0.0) >= since:
            return f"replica{view.get('slot')} cannot load: {view.get('error')}"
    return None
