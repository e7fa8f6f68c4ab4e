"""What crosses process boundaries about a fleet of hosts (docs/scaling.md, "A fleet"): a host
agent's record in Redis, the start command the control plane sends it, and a placement (which
slot goes to which host and device, and where its weights come from).

Plain dataclasses read from and written as JSON; fields added later are optional, and a reader
ignores the fields it does not know.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import redis

from common.keys import agent_key_pattern

CPU, CUDA = "cpu", "cuda"


@dataclass(frozen=True)
class Place:
    """A place for one replica on a host: a GPU, or a share of the CPU. `name` is the agent's
    (`cuda:3`, `cpu:1`): its kind and its index on the host (for a GPU, what the replica's
    `CUDA_VISIBLE_DEVICES` holds; the replica itself then sees `cuda:0`)."""
    name: str
    label: str = ""  # the GPU's model name, or "cpu"
    memory_total: int | None = None  # bytes (for a CPU place: the host's memory, shared)
    memory_free: int | None = None
    slot: int | None = None  # the replica slot that holds it, None when free

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def index(self) -> int:
        return int(self.name.split(":", 1)[1])


@dataclass(frozen=True)
class AgentRecord:
    """A host agent's presence (`common.keys.agent_key`), renewed like a heartbeat."""
    host: str
    pid: int = 0
    places: tuple[Place, ...] = ()
    models: tuple[str, ...] = ()  # complete host-cache entries: model hash prefixes (the entries' names)
    model_sha: str | None = None  # the model its replicas load
    weights_host: str | None = None  # the address its replicas' weight data planes listen on
    updated_at: float = 0.0
    # Its host cache, served by its own data plane (tasks/weights/host_cache.py)
    cache_addr: str | None = None  # http://host:port
    cache_shas: tuple[str, ...] = ()  # full model hashes it serves now
    cache_bytes: int = 0  # what the cache holds
    cache_limit: int = 0  # --host-cache-bytes (0: no bound)
    prebooted: int = 0  # pre-booted replica processes ready for its next starts (tasks/control/preboot_pool.py)

    def free_places(self) -> list[Place]:
        return [place for place in self.places if place.slot is None]

    def holds_model(self, sha: str | None) -> bool:
        return bool(sha) and any(sha.startswith(prefix) for prefix in self.models)

    def serves_model(self, sha: str | None) -> bool:
        """Its data plane serves the model from its host cache now."""
        return bool(sha) and bool(self.cache_addr) and sha in self.cache_shas

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "AgentRecord":
        data = _known(cls, json.loads(raw))
        data["places"] = tuple(Place(**_known(Place, p)) for p in data.get("places", ()))
        data["models"] = tuple(data.get("models", ()))
        data["cache_shas"] = tuple(data.get("cache_shas", ()))
        return cls(**data)


def read_agents(connection: redis.Redis) -> list[AgentRecord]:
    """Every present host agent's record (its key expires when the agent is gone), by host name."""
    keys = sorted(connection.scan_iter(match=agent_key_pattern(), count=100))
    agents = []
    for raw in connection.mget(keys) if keys else []:
        try:
            agents.append(AgentRecord.from_json(raw))
        except (TypeError, ValueError):  # expired meanwhile (None), or not a record we can read
            continue
    return sorted(agents, key=lambda agent: agent.host)


@dataclass(frozen=True)
class StartCommand:
    """A host agent's command: start `slot` on the place named `device` (None: the agent picks)."""
    slot: int
    device: str | None = None
    standby: bool = False
    op: str = "start"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "StartCommand":
        data = json.loads(raw)
        if data.get("op") != "start" or not isinstance(data.get("slot"), int) or isinstance(data["slot"], bool):
            raise ValueError(f"not a start command: {data!r}")
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Placement:
    """Where one new replica goes, decided before anything starts (tasks/control/placement.py):
    its host and place, and where its weights come from: `host-cache` (the host has them),
    `peer` (copied from `fetch_from`, in order: the chain's predecessor first), `source`
    (prepared from the model's source: nobody holds them)."""
    slot: int
    host: str
    device: str
    weights: str
    fetch_from: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict:
        return {**asdict(self), "fetch_from": list(self.fetch_from)}


def _known(cls, data: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
