"""Prometheus collectors whose values live in Redis and are read at scrape time."""
from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)


class RedisCollector:
    """`client`: anything with a `redis` attribute (the web's `GenerationClient`). Subclasses
    read their values in `read(redis)` and turn them into metric families in `families(values)`."""

    def __init__(self, client):
        self._redis = getattr(client, "redis", None)

    def collect(self):
        if self._redis is None:
            return
        try:
            values = self.read(self._redis)
        except (redis.RedisError, OSError) as error:  # Redis down: /metrics still answers with the rest
            log.debug("%s unavailable: %s", type(self).__name__, error)
            return
        yield from self.families(values)

    def read(self, connection):
        raise NotImplementedError

    def families(self, values):
        raise NotImplementedError
