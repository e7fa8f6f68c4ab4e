"""Every Redis key, channel and queue name the service uses, in one place."""

GENERATION_QUEUE = "generation"
KEY_PREFIX = "blitz:"


def stream_channel(request_id: str) -> str:
    """Pub/sub channel on which a replica publishes one request's events."""
    return f"{KEY_PREFIX}stream:{request_id}"


def replica_key(slot: int) -> str:
    """Hash-free JSON record of one replica, refreshed by its heartbeat (expires if it dies)."""
    return f"{KEY_PREFIX}replica:{slot}"


def replica_key_pattern() -> str:
    return f"{KEY_PREFIX}replica:*"


def replica_metrics_key(slot: int) -> str:
    """A replica's Prometheus metrics, in text exposition format, refreshed by its heartbeat."""
    return f"{KEY_PREFIX}replica-metrics:{slot}"


def replica_metrics_pattern() -> str:
    return f"{KEY_PREFIX}replica-metrics:*"
