"""A host agent's weight data plane over its host cache (docs/host-cache.md): every complete
entry of the cache is served to other hosts (the same `WeightServer`, the same secret as the
replicas' data planes), so that a model cached on any one host is a source for a cold start on
every other, and the cache is kept within its bound.

Each `refresh()` (the agent runs one a second): sweep what killed writers left, serve the entries
that appeared (their manifests are built once, in this thread, and remembered in the entry), stop
serving those that went, mark the entries read since the last pass as used, and evict down to
the bound. An entry a transfer reads (a request in flight, or one in the last `READ_GRACE_S`
seconds: between two chunks) is never evicted: the server stops serving it only when idle,
under its own lock.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis

from common.keys import host_cache_eviction_key
from common.settings import Settings
from tasks.weights.host_cache import CacheEntry, HostCache, touch
from tasks.weights.manifest import cached_manifest
from tasks.weights.secret import weights_secret
from tasks.weights.server import WeightServer
from tasks.weights.sources import advertised_host

log = logging.getLogger(__name__)

READ_GRACE_S = 10.0  # a transfer's pause between two requests, at most
EVICTION_CLAIM_S = 30.0  # > the time an agent's record takes to stop naming what it evicted


class CachePlane:
    def __init__(self, settings: Settings, connection: redis.Redis, host: str | None = None):
        self.settings = settings
        self.redis = connection
        self.host = host or settings.host
        self.cache = HostCache(settings.weight_cache_dir, settings.host_cache_bytes)
        self.server: WeightServer | None = None
        self._entries: dict[str, Path] = {}  # sha → the entry served
        self._read_at: dict[str, float] = {}  # sha → its holding's last read, as of the last pass
        self._corrupt: set[str] = set()  # found corrupt, not yet removed (a replica maps it): not served
        self._lock = threading.Lock()

    def start(self) -> "CachePlane":
        """Without a data plane (address taken, Redis away) the cache is still bounded; it just
        serves no other host."""
        self.cache.sweep()
        try:
            host = advertised_host(self.settings.weights_host)
            self.server = WeightServer(host, self.settings.host_cache_port, weights_secret(self.settings, self.redis),
                                       max_rate=self.settings.weights_max_send_rate * 1e6).start()
            log.info("host cache: data plane on %s (bound: %s)", self.server.address,
                     f"{self.cache.limit} bytes" if self.cache.limit else "none")
        except (OSError, redis.RedisError) as error:
            log.error("host cache: data plane not started (%s): this host's cache serves no other host", error)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def address(self) -> str | None:
        return self.server.address if self.server else None

    def served(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def refresh(self, duplicated: set[str] = frozenset()) -> list[str]:
        """One pass: serve, mark used, evict (entries other hosts hold too, `duplicated`, first).
        Returns the entries evicted."""
        self.cache.sweep()
        entries = self.cache.entries()
        if self.server is not None:
            entries = self._remove_corrupt(entries)
            self._serve(entries)
            self._mark_read()
        return self.cache.evict(duplicated=set(duplicated), may_evict=self._may_evict)

    def _remove_corrupt(self, entries: list[CacheEntry]) -> list[CacheEntry]:
        """Entries whose files rotted (the server found a chunk that fails its checksum): removed,
        unless a replica of this host maps one (then it is only no longer served). The others."""
        self._corrupt.update(self.server.corrupt())
        kept = []
        for entry in entries:
            if entry.sha not in self._corrupt:
                kept.append(entry)
            elif self.cache.remove(entry, may_remove=self._may_remove_corrupt):
                log.error("host cache: removed %s: a chunk failed its checksum", entry.name)
                self._corrupt.discard(entry.sha)  # a good copy may come back under its name
        self._corrupt.intersection_update(entry.sha for entry in entries)  # evicted meanwhile: forgotten too
        return kept

    def _serve(self, entries: list[CacheEntry]) -> None:
        present = {e.sha: e.path for e in entries if e.sha}
        with self._lock:
            gone = [sha for sha in self._entries if sha not in present]
            new = {sha: path for sha, path in present.items() if sha not in self._entries}
        for sha in gone:
            if self.server.release_if_idle(sha, 0.0):  # a transfer under way finishes from its open files
                with self._lock:
                    self._entries.pop(sha, None)
        for sha, path in new.items():
            try:
                manifest = cached_manifest(path, sha, self.settings.weights_chunk_size, True,
                                           self.settings.weights_checksum)
                self.server.hold(manifest, path, complete=True, verify=True, keep_open=False)
            except OSError as error:  # evicted or being replaced meanwhile: the next pass sees
                log.warning("host cache: cannot serve %s: %s", path.name, error)
                continue
            with self._lock:
                self._entries[sha] = path
            log.info("host cache: serving %s (%d MB)", path.name, manifest.total // 10**6)

    def _mark_read(self) -> None:
        """Entries another host read since the last pass were used (LRU)."""
        with self._lock:
            served = dict(self._entries)
        for sha, path in served.items():
            read_at = self.server.last_read(sha)
            if read_at and read_at != self._read_at.get(sha):
                self._read_at[sha] = read_at
                touch(path)

    def _may_remove_corrupt(self, entry: CacheEntry) -> bool:
        """No request starts on a corrupt holding: once those under way are done, it goes."""
        if not self.server.release_if_idle(entry.sha, 0.0):
            return False
        with self._lock:
            self._entries.pop(entry.sha, None)
        return True

    def _may_evict(self, entry: CacheEntry) -> bool:
        """Called with the entry's locks held: stop serving it, unless a transfer reads it or
        another host is evicting the same model (its claim)."""
        if self.server is None or entry.sha is None:
            return True
        if not self._claim(entry.sha):
            return False
        if not self.server.release_if_idle(entry.sha, READ_GRACE_S):
            self._unclaim(entry.sha)
            return False
        with self._lock:
            self._entries.pop(entry.sha, None)
        return True

    def _claim(self, sha: str) -> bool:
        """The cluster-wide right to evict `sha` for a while (kept after the eviction: until our
        record stops naming the model, another host would count on our copy)."""
        try:
            key = host_cache_eviction_key(sha)
            return bool(self.redis.set(key, self.host, nx=True, ex=int(EVICTION_CLAIM_S))) or \
                self.redis.get(key) == self.host.encode()
        except redis.RedisError:  # no records to decide by either: the bound comes first
            return True

    def _unclaim(self, sha: str) -> None:
        try:
            key = host_cache_eviction_key(sha)
            if self.redis.get(key) == self.host.encode():
                self.redis.delete(key)
        except redis.RedisError:
            pass


def run_forever(plane: CachePlane, stop: threading.Event, duplicated, period: float = 1.0) -> None:
    """`refresh()` every `period` seconds until `stop`; `duplicated()` names the models other
    hosts' caches hold too."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            plane.refresh(duplicated())
        except (OSError, redis.RedisError) as error:
            log.warning("host cache: %s", error)
        stop.wait(max(0.0, period - (time.monotonic() - started)))
