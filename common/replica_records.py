"""The one reader of the replicas' heartbeat records (`common.keys.replica_key`), for every part
that asks which replicas live: the web's routing and checks, the control plane's cluster view,
the weight sources, the host agent and the probe."""
from __future__ import annotations

import json

import redis

from common.keys import replica_key_pattern


def live_records(connection: redis.Redis) -> list[dict]:
    """The record of every replica whose heartbeat has not expired (one SCAN, one MGET; a record
    that expired in between, or that cannot be read, is left out)."""
    keys = list(connection.scan_iter(match=replica_key_pattern(), count=100))
    records = []
    for raw in connection.mget(keys) if keys else []:
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
