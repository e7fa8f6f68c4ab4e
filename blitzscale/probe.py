"""`blitzscale probe agent|replica [--ready]`: an exit status for an orchestrator's exec probes
(deploy/k8s/), read from what the process advertises in Redis, so a probe sees what the control
plane sees:

- `agent`: this host's agent record is there (it is renewed every second; it expires within
  seconds of the agent dying or hanging);
- `replica`: a replica of this host has a fresh heartbeat (it beats while it loads, too);
  `--ready`: one has loaded its weights (active, draining or standby).
"""
from __future__ import annotations

import redis

from common.keys import agent_key
from common.settings import Settings
from common.states import ReplicaState
from common.replica_records import live_records

LOADED = (ReplicaState.ACTIVE, ReplicaState.DRAINING, ReplicaState.STANDBY)


def probe(settings: Settings, role: str, ready: bool = False) -> int:
    if not settings.redis_url:
        raise SystemExit("blitzscale probe needs REDIS_URL (or --redis-url)")
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        if role == "agent":
            return 0 if connection.exists(agent_key(settings.host)) else 1
        mine = [r for r in live_records(connection) if r.get("host") == settings.host]
        return 0 if any(r.get("state") in LOADED for r in mine) or (mine and not ready) else 1
    except redis.RedisError:
        return 1
