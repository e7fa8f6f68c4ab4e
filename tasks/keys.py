"""Every Redis key, channel and queue name the service uses, in one place."""

GENERATION_QUEUE = "generation"
KEY_PREFIX = "blitz:"


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
