"""A replica's weights, BlitzScale's way: from this host's cache, else from a live peer over the
network, else from another host's cache over the network, else prepared from the model's source;
and served to peers by its data plane (docs/peer-weights.md, docs/host-cache.md).

    replica start ─► data plane up (advertised in the replica's record: `weights`)
                  ─► pin the host-cache entry (never evicted while this replica maps it)
                  ─► this host's cache has the model?  yes: map it ("host-cache", this host)
                  ─► a peer has it (the command's old stubs, the chain predecessor, anyone), or
                     else another host's agent serves it from its cache?
                       pull its chunks in parallel into a staging directory next to the cache
                       entry, forwarding each verified chunk to our own successor; all there and
                       verified: rename into the cache ("peer", or "host-cache" from that host)
                  ─► else prepare it from its source as before ("gguf-conversion", "download",
                     "directory"); a download, or a directory on slow storage (`--weight-peers
                     prefer`), is copied into this host's cache too, so that the cluster holds it
                     once

A partial or corrupt copy is never renamed into the cache: the staging directory is deleted when
the transfer fails, and one left by a killed process is swept by the next one that takes the
entry's lock. The record's `transfer` shows the source and progress while it runs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import redis

from common import model_files
from common.settings import Settings
from tasks.weights.fetch import ChunkFetcher, Source, SourceGone, fetch_manifest
from tasks.weights.host_cache import Pin, entry_lock, keep_copy, write_identity
from tasks.weights.manifest import Manifest, cached_manifest, memo_name, served_files
from tasks.weights.server import WeightServer
from tasks.weights.sources import (
    COMPLETE, FETCHING, HOST_CACHE, INDEXING, PREPARING, STARTING, PeerChooser, advertised_host, count_transfer,
    planned_sources,
)
from tasks.weights.secret import weights_secret

log = logging.getLogger(__name__)

PEER = "peer"


@dataclass(frozen=True)
class Obtained:
    directory: Path
    source: str  # host-cache | peer | gguf-conversion | download | directory (sources.COLD_START_SOURCES: the coarse name)
    seconds: float
    host: str | None = None  # the host it came from (a host cache's, a peer's; ours for the local cache)


class ReplicaWeights:
    def __init__(self, settings: Settings, slot: int, name: str, connection: redis.Redis):
        self.settings = settings
        self.slot = slot
        self.name = name
        self.redis = connection
        self.server: WeightServer | None = None
        self.secret = ""
        self.sha: str | None = None
        self.state = STARTING
        self.transfer: dict | None = None
        self.adapters: dict[str, str] = {}  # LoRA adapters served too: name -> content hash (adapter_weights.py)
        self._holding = None
        self._fetcher: ChunkFetcher | None = None
        self._pin: Pin | None = None
        self._lock = threading.Lock()

    # -- the data plane

    def start(self) -> "ReplicaWeights":
        """Start the data plane; a replica that cannot (address taken, Redis away) still serves
        requests, it just neither gives nor takes weights from peers."""
        try:
            self.secret = weights_secret(self.settings, self.redis)
            host = advertised_host(self.settings.weights_host)
            self.server = WeightServer(host, self.settings.weights_port, self.secret,
                                       max_rate=self.settings.weights_max_send_rate * 1e6).start()
            log.info("weights data plane on %s", self.server.address)
        except (OSError, redis.RedisError) as error:
            log.error("weights data plane not started (%s): no weights from or to peers", error)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self._pin is not None:
            self._pin.release()

    def record(self) -> dict:
        """What the replica's record advertises (and /cluster_state shows)."""
        holding = self._holding
        weights = {"addr": self.server.address if self.server else None, "sha": self.sha, "state": self.state,
                   "sent_bytes": holding.sent_bytes if holding is not None else 0, "adapters": dict(self.adapters)}
        with self._lock:
            transfer = dict(self.transfer) if self.transfer else None
        if transfer and transfer["state"] == FETCHING:
            elapsed = time.perf_counter() - transfer.pop("_started")
            transfer.update(seconds=round(elapsed, 3), mbps=round(transfer["bytes"] / 1e6 / max(elapsed, 1e-6), 1),
                            source=self._fetcher_source())
        else:
            (transfer or {}).pop("_started", None)
        return {"weights": weights, "transfer": transfer}

    # -- obtaining the weights

    def obtain(self, source: model_files.ModelSource, prepare_locally: Callable[[], object]) -> Obtained:
        """The directory to load, from the host cache, a peer, or `prepare_locally()` (which
        returns something with `directory`, `source` and `seconds`)."""
        started = time.perf_counter()
        self.sha = source.sha
        entry = model_files.cache_entry(self.settings, source.sha)
        self._pin = _pin(entry)  # for this process's life: the entry is mapped from now on
        if model_files.entry_complete(entry):
            self._serve(entry, writable=True)
            log.info("weights: %s from this host's cache", source.sha[:12])
            return Obtained(entry, HOST_CACHE, time.perf_counter() - started, self.settings.host)
        if self.server is not None and self._peers_allowed(source):
            fetched = self._from_peers(entry, started)
            if fetched is not None:
                return fetched
        self.state = PREPARING
        prepared = prepare_locally()
        if prepared.directory == entry:
            try:
                write_identity(entry, self.sha)  # a conversion: the agent serves the entry by this hash
            except OSError as error:
                log.warning("weights: cannot name %s's hash in its entry (%s): its agent will not serve it",
                            entry.name, error)
        self._serve(prepared.directory, writable=prepared.directory == entry)
        if prepared.directory != entry:
            if self._pin is not None:
                self._pin.release()  # loaded from the source itself
            if self.settings.weight_peers == "prefer" or source.is_download:
                self._keep_in_host_cache(prepared.directory, entry)
        return Obtained(prepared.directory, prepared.source, prepared.seconds, self.settings.host)

    def _keep_in_host_cache(self, directory: Path, entry: Path) -> None:
        """A model read from slow storage: a copy in this host's cache serves the cluster's next
        cold starts (in the background: our own load reads the source meanwhile)."""
        size = sum(p.stat().st_size for p in served_files(directory))
        if 0 < self.settings.host_cache_bytes < size:
            log.info("weights: %s (%d MB) is larger than the host cache's bound; not kept", self.sha[:12], size >> 20)
            return

        def copy():
            try:
                if keep_copy(directory, entry, self.sha, self.settings.weights_chunk_size,
                             self.settings.weights_checksum):
                    log.info("weights: %s kept in this host's cache", self.sha[:12])
            except OSError as error:
                log.warning("weights: cannot keep %s in the host cache: %s", directory, error)
        threading.Thread(target=copy, name="weights-keep", daemon=True).start()

    def _peers_allowed(self, source: model_files.ModelSource) -> bool:
        policy = self.settings.weight_peers
        return policy == "prefer" or (policy == "auto" and (source.is_gguf or source.is_download))

    def _serve(self, directory: Path, writable: bool) -> None:
        """Serve a complete directory once its manifest is built (in the background: hashing a
        large model must not delay this replica's own load)."""
        if self.server is None:
            return
        self.state = INDEXING

        def index():
            try:
                manifest = cached_manifest(directory, self.sha, self.settings.weights_chunk_size, writable,
                                           self.settings.weights_checksum)
                self._holding = self.server.hold(manifest, directory, complete=True)
                self.state = COMPLETE
            except OSError as error:
                log.warning("weights: cannot serve %s: %s", directory, error)
        threading.Thread(target=index, name="weights-index", daemon=True).start()

    def _from_peers(self, entry: Path, started: float) -> Obtained | None:
        chooser = _Remembering(PeerChooser(self.redis, self.sha, self.name, planned_sources(self.redis, self.slot),
                                           self.settings.weights_peer_wait, host=self.settings.host))
        with entry_lock(entry):
            if model_files.entry_complete(entry):  # another replica of this host copied it meanwhile
                self._serve(entry, writable=True)
                return Obtained(entry, HOST_CACHE, time.perf_counter() - started, self.settings.host)
            sweep_staging(entry)
            first = _first_manifest(chooser, self.sha, self.secret)
            if first is None:
                log.info("weights: no peer holds %s; preparing it here", self.sha[:12])
                return None
            manifest, excluded = first
            staging = entry.with_name(f"{entry.name}.staging-{os.getpid()}")
            try:
                return self._fetch(manifest, excluded, chooser, staging, entry, started)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # renamed when it worked

    def _fetch(self, manifest: Manifest, excluded: set[str], chooser: "_Remembering", staging: Path, entry: Path,
               started: float) -> Obtained | None:
        fetcher = ChunkFetcher(manifest, staging, self.secret, self.settings.weights_parallel, self._on_chunk)
        fetcher.create_files()
        self._fetcher = fetcher
        self._holding = self.server.hold(manifest, staging, complete=False)  # our successor pulls from us
        with self._lock:
            self.transfer = {"state": FETCHING, "bytes": 0, "total": manifest.total, "chunks": len(manifest.chunks),
                             "_started": time.perf_counter()}
        self.state = FETCHING
        try:
            stats = fetcher.run(lambda failed: chooser(failed | excluded))
        except Exception as error:  # noqa: BLE001 (whatever broke the copy, the model is prepared here)
            log.warning("weights: copy from peers failed (%s); preparing the model here", error)
            self.server.release(self.sha)  # successors move on at once
            self._holding = None
            count_transfer(self.redis, fetcher.stats.bytes_by_source, None)
            self._end_transfer("failed", fetcher)
            return None
        (staging / memo_name(manifest.checksum, manifest.chunk_size)).write_text(manifest.to_json())
        write_identity(staging, self.sha)
        (staging / model_files.PEER_MARKER).write_text(json.dumps(
            {"root": manifest.root, "sources": dict(stats.bytes_by_source), "copied_at": time.time()}))
        shutil.rmtree(entry, ignore_errors=True)  # a tokenizer-only entry is superseded
        os.replace(staging, entry)
        self.state = COMPLETE
        count_transfer(self.redis, stats.bytes_by_source, stats.seconds)
        self._end_transfer("done", fetcher)
        main = chooser.seen[max(stats.bytes_by_source, key=stats.bytes_by_source.get)]
        kind = HOST_CACHE if main.name.startswith(HOST_CACHE + "@") else PEER
        log.info("weights: %d MB from %s (%s on host %s) in %.2f s (%d corrupt chunks fetched again)",
                 manifest.total // 10**6, ", ".join(stats.bytes_by_source), kind, main.host, stats.seconds,
                 stats.corrupt_chunks)
        return Obtained(entry, kind, time.perf_counter() - started, main.host)

    def _on_chunk(self, index: int, nbytes: int, _source: str) -> None:
        self._holding.mark(index)
        with self._lock:
            self.transfer["bytes"] += nbytes

    def _fetcher_source(self) -> str | None:
        source = self._fetcher.current_source if self._fetcher else None
        return source.name if source else None

    def _end_transfer(self, state: str, fetcher: ChunkFetcher) -> None:
        with self._lock:
            elapsed = time.perf_counter() - self.transfer.pop("_started")
            self.transfer.update(state=state, seconds=round(elapsed, 3),
                                 mbps=round(self.transfer["bytes"] / 1e6 / max(elapsed, 1e-6), 1),
                                 sources=dict(fetcher.stats.bytes_by_source),
                                 corrupt_chunks=fetcher.stats.corrupt_chunks,
                                 failed_sources=list(fetcher.stats.failed_sources))
            self.transfer["source"] = next(iter(fetcher.stats.bytes_by_source), None)
        self._fetcher = None


def _pin(entry: Path) -> Pin | None:
    """The entry pinned, or None where the cache cannot be written (a read-only volume, which no
    agent can evict from either): the replica still loads, from the cache or the source."""
    try:
        return Pin(entry)
    except OSError as error:
        log.warning("weights: cannot pin %s in the host cache: %s", entry.name, error)
        return None


class _Remembering:
    """A chooser that remembers every source it gave (by name: the transfer's stats name them)."""

    def __init__(self, chooser: PeerChooser):
        self.chooser = chooser
        self.seen: dict[str, Source] = {}

    def __call__(self, excluded: set[str]) -> Source | None:
        source = self.chooser(excluded)
        if source is not None:
            self.seen[source.name] = source
        return source


def _first_manifest(chooser: _Remembering, sha: str, secret: str) -> tuple[Manifest, set[str]] | None:
    """The manifest from the first source that answers; the sources that did not are excluded."""
    excluded: set[str] = set()
    while (source := chooser(excluded)) is not None:
        try:
            return fetch_manifest(source, sha, secret), excluded
        except SourceGone as error:
            log.warning("weights: %s", error)
            excluded.add(source.name)
    return None


def sweep_staging(entry: Path) -> None:
    """Staging directories of this entry left by a process that died (we hold the entry's lock,
    so nobody is writing one)."""
    for leftover in entry.parent.glob(f"{entry.name}.staging-*"):
        log.info("weights: removing %s (left by a process that died)", leftover.name)
        shutil.rmtree(leftover, ignore_errors=True)


