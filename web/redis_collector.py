"""Prometheus figures whose values live in Redis and are read at scrape time.

During a Redis outage /metrics still answers: each source keeps the figures of its last read
that succeeded, and `blitz_cluster_figures_stale{source}` is 1 while they are that old."""
from __future__ import annotations

import logging

import redis
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

STALE = "blitz_cluster_figures_stale"


class RedisReader:
    """One source of figures. Subclasses read their values in `read(client)` (the web's
    `GenerationClient`; raises on a Redis error) and turn them into families in `families(values)`."""

    source = ""
    needs_redis = True  # reads the client's `redis` connection (a test double may have none)

    def read(self, client):
        raise NotImplementedError

    def families(self, values):
        raise NotImplementedError


class RedisFigures:
    """One collector for every `RedisReader` (those the client can serve)."""

    def __init__(self, client, readers: list[RedisReader]):
        self._client = client
        self._readers = readers
        self._last: dict[str, object] = {}  # source -> values of its last read that succeeded

    def collect(self):
        readers = [r for r in self._readers if not r.needs_redis or getattr(self._client, "redis", None) is not None]
        if not readers:
            return
        stale = GaugeMetricFamily(STALE, "1 when Redis could not be read at this scrape: the source's figures are "
                                  "those of its last read that succeeded (none if it never did)", labels=["source"])
        for reader in readers:
            try:
                self._last[reader.source] = reader.read(self._client)
                stale.add_metric([reader.source], 0)
            except (redis.RedisError, OSError) as error:  # Redis down: the last figures, marked stale
                log.debug("%s figures unavailable: %s", reader.source, error)
                stale.add_metric([reader.source], 1)
            if reader.source in self._last:
                yield from reader.families(self._last[reader.source])
        yield stale
