"""The peak of each web process's Redis connections, sampled from `CLIENT LIST` while a load runs
(the web names its connections `blitz-web-<pid>`: tasks/client/generation_client.py)."""
from __future__ import annotations

import threading
from collections import Counter

import redis

WEB_PREFIX = "blitz-web-"


class ConnectionPeak:
    """`with ConnectionPeak(url) as peak: ...`; then `peak.per_process` (name -> most connections
    seen at once) and `peak.highest`."""

    def __init__(self, redis_url: str, every: float = 0.05):
        self._redis = redis.Redis.from_url(redis_url)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="connection-peak", daemon=True)
        self.per_process: Counter = Counter()

    @property
    def highest(self) -> int:
        return max(self.per_process.values(), default=0)

    def __enter__(self) -> "ConnectionPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            try:
                clients = self._redis.client_list()
            except redis.RedisError:
                continue  # an outage, during a test of one
            now = Counter(c["name"] for c in clients if c.get("name", "").startswith(WEB_PREFIX))
            for name, count in now.items():
                self.per_process[name] = max(self.per_process[name], count)
