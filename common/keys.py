"""Every Redis key, channel and queue name the service uses, in one place."""

GENERATION_QUEUE = "generation"
KEY_PREFIX = "blitz:"


def replica_queue(name: str) -> str:
    """A replica's own Celery queue (besides the shared one): the jobs prefix affinity routes
    to it (tasks/client/affinity.py). `name` is its worker name, `replica<slot>@<host>`."""
    return f"{GENERATION_QUEUE}@{name}"


def routed_key(name: str) -> str:
    """Sorted set: the requests prefix affinity sent to replica `name`'s own queue that it has not
    started (or started too recently for its record to show them), scored by when each stops
    counting (tasks/client/affinity.py)."""
    return f"{KEY_PREFIX}routed:{name}"


def affinity_key(prefix_key: str) -> str:
    """Which replica last started a job whose prompt begins with this prefix (expires)."""
    return f"{KEY_PREFIX}affinity:{prefix_key}"


def stream_channel(request_id: str) -> str:
    """Pub/sub channel on which a replica publishes one request's events."""
    return f"{KEY_PREFIX}stream:{request_id}"


def replica_key(name: str) -> str:
    """JSON record of one replica (by its worker name, `replica<slot>@<host>`), refreshed by
    its heartbeat; it expires when the replica dies."""
    return f"{KEY_PREFIX}replica:{name}"


def replica_key_pattern() -> str:
    return f"{KEY_PREFIX}replica:*"


def replica_metrics_key(name: str) -> str:
    """A replica's Prometheus metrics, in text exposition format, refreshed by its heartbeat."""
    return f"{KEY_PREFIX}replica-metrics:{name}"


def replica_metrics_pattern() -> str:
    return f"{KEY_PREFIX}replica-metrics:*"


# -- Cluster control (tasks/control/cluster.py, tasks/control/agent.py, tasks/control/autoscaler.py)

SLOTS_KEY = f"{KEY_PREFIX}slots"
"""Hash: slot -> JSON of the last replica seen in it and the state it was meant to reach, so a
slot whose replica vanished (heartbeat expired without a clean stop) is shown as `dead`."""

SCALE_COUNTERS_KEY = f"{KEY_PREFIX}scale-counters"
"""Hash: counter name -> count (scale-ups, scale-downs, autoscaler decisions)."""

AUTOSCALER_KEY = f"{KEY_PREFIX}autoscaler"
"""JSON of the autoscaler's last decision (expires when the autoscaler stops)."""


def slot_target_key(slot: int) -> str:
    """What a slot's replica is told to become: `active`, `standby` or `stopped`. A replica that
    is drained and told `stopped` sends Celery's shutdown to itself."""
    return f"{KEY_PREFIX}slot-target:{slot}"


def slot_lease_key(slot: int) -> str:
    """Which replica holds a slot (refreshed by its heartbeat); `--slot auto` claims a free one."""
    return f"{KEY_PREFIX}slot-lease:{slot}"


def agent_key(host: str) -> str:
    """A host agent's record (`common.fleet.AgentRecord`, refreshed while it runs): its places,
    which replica holds each, its host cache; it can start replica processes there."""
    return f"{KEY_PREFIX}agent:{host}"


def agent_key_pattern() -> str:
    return f"{KEY_PREFIX}agent:*"


def agent_commands_key(host: str) -> str:
    """List of JSON commands for one host's agent (`common.fleet.StartCommand`)."""
    return f"{KEY_PREFIX}agent-commands:{host}"


PLACEMENT_KEY = f"{KEY_PREFIX}placement"
"""JSON of the last placement the control plane computed and executed (shown in /cluster_state)."""

CLUSTER_LOCK_KEY = f"{KEY_PREFIX}cluster-lock"
"""Held while a scaling command plans and applies its steps (one command at a time)."""


SWEEP_TURN_KEY = f"{KEY_PREFIX}sweep-turn"
"""Held for most of a sweep interval by the replica whose turn it is to sweep (tasks/queue/hygiene.py)."""


def attempt_key(request_id: str) -> str:
    """The current attempt number of a request that the web re-enqueued after its replica
    died; a replica that takes an older attempt's job skips it (see tasks.client.event_stream)."""
    return f"{KEY_PREFIX}attempt:{request_id}"


def admission_key() -> str:
    """Sorted set of the admitted requests of every web process: member = lease id, score =
    the lease's expiry (Redis server time); see web.admission."""
    return f"{KEY_PREFIX}admission"


# -- Weights from peers (tasks/weights/sources.py, tasks/runtime/peer_weights.py)

WEIGHT_SECRET_KEY = f"{KEY_PREFIX}weights-secret"
"""The data plane's shared secret when no key is configured (made once per cluster)."""

WEIGHT_TRANSFERS_KEY = f"{KEY_PREFIX}weight-transfers"
"""Hash: `bytes:<source>` and the transfer-duration histogram (`duration:count|sum|le:<bound>`)."""


def weight_sources_key(slot: int) -> str:
    """JSON list of the slots a replica starting in `slot` takes its weights from, in order (its
    predecessor in a scale-up's chain first, then the command's `old_stub_indices`)."""
    return f"{KEY_PREFIX}weight-sources:{slot}"


def host_cache_eviction_key(sha: str) -> str:
    """Held (the evicting host's name, a short TTL) by a host evicting a model from its host cache:
    no other host evicts that model meanwhile, so two hosts never both drop the cluster's last
    copies, each because the other's record still names it (tasks/weights/cache_plane.py)."""
    return f"{KEY_PREFIX}host-cache-eviction:{sha}"


def tenant_limit_key(tenant: str, what: str) -> str:
    """A sorted set of one tenant's recent requests (`rpm`), token charges (`tpm`) or leases
    (`concurrent`), shared by every web process (web/rate_limits.py)."""
    return f"{KEY_PREFIX}tenant:{tenant}:{what}"


def stored_response_key(response_id: str) -> str:
    """A stored /v1/responses answer and its conversation (JSON, expires; see web.openai.responses_store)."""
    return f"{KEY_PREFIX}response:{response_id}"


MODEL_USED_KEY = f"{KEY_PREFIX}model-used"
"""Hash: model name -> when it was last used, a request or a replica turning active (scale to zero,
LRU eviction: common/model_use.py)."""
