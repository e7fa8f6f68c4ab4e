"""Where a starting replica gets its weights, as the cluster knows it in Redis.

- The plan: a scale-up that starts several replicas chains them across hosts (the placement,
  tasks/control/placement.py): the first takes its weights from the command's `old_stub_indices`
  (or the replicas holding the model), each next one from its predecessor first (which forwards
  the chunks as they arrive), so the source sends each byte once.
- The peers: every replica advertises its data plane in its record (`weights`: address, model
  hash, state), every host agent its host cache's (`AgentRecord.cache_addr`); `PeerChooser`
  picks the planned slots first, then any replica holding the model, then a host cache of
  another host that holds it (docs/host-cache.md).
- The names of where a cold start's weights came from (`COLD_START_SOURCES`).
- The transfer counters read by /metrics (the data plane's secret: tasks/weights/secret.py).
No torch, no Celery: the web imports this.
"""
from __future__ import annotations

import json
import logging
import socket
import time

import redis

from common.fleet import read_agents
from common.keys import WEIGHT_TRANSFERS_KEY, weight_sources_key
from common.replica_records import live_records
from common.settings import Settings
from common.states import ReplicaState
from tasks.weights.fetch import Source

log = logging.getLogger(__name__)

# A replica's `weights.state`: what it can give a peer.
STARTING, FETCHING, PREPARING, INDEXING, COMPLETE = "starting", "fetching", "preparing", "indexing", "complete"
SERVING = (FETCHING, COMPLETE)  # chunks can be pulled from it now
COMING = (STARTING, INDEXING)  # worth waiting for
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PLAN_TTL_S = 300
HOST_CACHE = "host-cache"
# A replica's `weight_source` (the fine name) → the cold start's source for its record, metrics and reports:
# a live replica, a host cache (this host's, mapped, or another's over the network), the source.
COLD_START_SOURCES = {"peer": "replica", HOST_CACHE: HOST_CACHE, "gguf-conversion": "source",
                      "download": "source", "directory": "source"}


def cold_start_source(weight_source: str) -> str:
    return COLD_START_SOURCES.get(weight_source, "source")


def host_cache_source_name(host: str) -> str:
    return f"{HOST_CACHE}@{host}"


def store_sources(connection: redis.Redis, plan: dict[int, list[int]]) -> None:
    """Each starting slot's sources, in order (a placement's `fetch_from`: tasks/control/placement.py)."""
    pipe = connection.pipeline()
    for slot, sources in plan.items():
        pipe.set(weight_sources_key(slot), json.dumps(list(sources)), ex=PLAN_TTL_S)
    pipe.execute()


def planned_sources(connection: redis.Redis, slot: int) -> list[int]:
    raw = connection.get(weight_sources_key(slot))
    return [int(s) for s in json.loads(raw)] if raw else []


def advertised_host(setting: str) -> str:
    """The address a data plane listens on and advertises (`--weights-host`; `auto`: this host
    name's address)."""
    return socket.gethostbyname(socket.gethostname()) if setting == "auto" else setting


class PeerChooser:
    """`choose(excluded)` for `ChunkFetcher`: the planned slots in order (waiting up to `wait_s`
    for one that is still starting), then any live replica that holds or is receiving the model
    (complete first), then the host cache of another host that serves it. None when nobody is
    left."""

    def __init__(self, connection: redis.Redis, sha: str, me: str, planned: list[int], wait_s: float = 60.0,
                 poll_s: float = 0.2, host: str | None = None):
        """`host`: ours (its cache is no source over the network: a replica maps it)."""
        self.redis = connection
        self.sha = sha
        self.me = me
        self.host = host
        self.planned = list(planned)
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._given_up: set[int] = set()

    def __call__(self, excluded: set[str]) -> Source | None:
        for slot in self.planned:
            if slot not in self._given_up:
                source = self._wait_for_slot(slot, excluded)
                if source is not None:
                    return source
                self._given_up.add(slot)
        holders = [r for r in live_records(self.redis) if self._usable(r, excluded)]
        holders.sort(key=lambda r: (r["weights"]["state"] != COMPLETE, r.get("state") != ReplicaState.ACTIVE, r.get("slot", 0)))
        if holders:
            return self._source(holders[0])
        return next((Source(host_cache_source_name(a.host), a.cache_addr, a.host) for a in read_agents(self.redis)
                     if a.host != self.host and a.serves_model(self.sha)
                     and host_cache_source_name(a.host) not in excluded), None)

    def _wait_for_slot(self, slot: int, excluded: set[str]) -> Source | None:
        deadline = time.monotonic() + self.wait_s
        while True:
            record = next((r for r in live_records(self.redis) if r.get("slot") == slot), None)
            if record is not None and self._usable(record, excluded):
                return self._source(record)
            weights = (record or {}).get("weights") or {}
            coming = record is None or (weights.get("state") in COMING and weights.get("sha") in (None, self.sha))
            if not coming or record is not None and record.get("name") in excluded or time.monotonic() > deadline:
                return None
            time.sleep(self.poll_s)

    def _usable(self, record: dict, excluded: set[str]) -> bool:
        weights = record.get("weights") or {}
        return (record.get("name") not in excluded and record.get("name") != self.me and weights.get("addr")
                and weights.get("sha") == self.sha and weights.get("state") in SERVING)

    @staticmethod
    def _source(record: dict) -> Source:
        return Source(record["name"], record["weights"]["addr"], record.get("host"))


def count_transfer(connection: redis.Redis, bytes_by_source: dict[str, int], seconds: float | None) -> None:
    """Bytes received from each source; `seconds` of a finished transfer (None: it failed)."""
    pipe = connection.pipeline()
    for source, nbytes in bytes_by_source.items():
        if nbytes:
            pipe.hincrby(WEIGHT_TRANSFERS_KEY, f"bytes:{source}", nbytes)
    if seconds is not None:
        pipe.hincrby(WEIGHT_TRANSFERS_KEY, "duration:count", 1)
        pipe.hincrbyfloat(WEIGHT_TRANSFERS_KEY, "duration:sum", seconds)
        bound = next((b for b in DURATION_BUCKETS if seconds <= b), "+Inf")
        pipe.hincrby(WEIGHT_TRANSFERS_KEY, f"duration:le:{bound}", 1)
    pipe.execute()


def read_transfers(connection: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in connection.hgetall(WEIGHT_TRANSFERS_KEY).items()}
