"""A replica's weights, BlitzScale's way: from the host cache, else from a live peer over the
network, else prepared from the model's source; and served to peers by its data plane.

    replica start ─► data plane up (advertised in the replica's record: `weights`)
                  ─► host cache has the model?  yes: map it ("host-cache")
                  ─► a peer has it (the command's old stubs, the chain predecessor, anyone)?
                       pull its chunks in parallel into a staging directory next to the cache
                       entry, forwarding each verified chunk to our own successor; all there and
                       verified: rename into the cache ("peer")
                  ─► else prepare it from its source as before ("gguf-conversion", "directory")

A partial or corrupt copy is never renamed into the cache: the staging directory is deleted when
the transfer fails, and one left by a killed process is swept by the next one that takes the
entry's lock. The record's `transfer` shows the source and progress while it runs.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import redis

from common import model_files
from common.settings import Settings
from tasks.weights.fetch import ChunkFetcher, SourceGone, fetch_manifest
from tasks.weights.manifest import Manifest, cached_manifest, memo_name
from tasks.weights.server import WeightServer
from tasks.weights.sources import (
    COMPLETE, FETCHING, INDEXING, PREPARING, STARTING, PeerChooser, advertised_host, count_transfer, planned_sources,
)
from tasks.weights.secret import weights_secret

log = logging.getLogger(__name__)

PEER = "peer"


@dataclass(frozen=True)
class Obtained:
    directory: Path
    source: str  # host-cache | peer | gguf-conversion | directory
    seconds: float


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
        if model_files.entry_complete(entry):
            self._serve(entry, writable=True)
            return Obtained(entry, "host-cache", time.perf_counter() - started)
        if self.server is not None and self._peers_allowed(source):
            fetched = self._from_peers(entry, started)
            if fetched is not None:
                return fetched
        self.state = PREPARING
        prepared = prepare_locally()
        self._serve(prepared.directory, writable=prepared.directory == entry)
        return Obtained(prepared.directory, prepared.source, prepared.seconds)

    def _peers_allowed(self, source: model_files.ModelSource) -> bool:
        policy = self.settings.weight_peers
        return policy == "prefer" or (policy == "auto" and source.is_gguf)

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
        chooser = PeerChooser(self.redis, self.sha, self.name, planned_sources(self.redis, self.slot),
                              self.settings.weights_peer_wait)
        with entry_lock(entry):
            if model_files.entry_complete(entry):  # another replica of this host copied it meanwhile
                self._serve(entry, writable=True)
                return Obtained(entry, "host-cache", time.perf_counter() - started)
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

    def _fetch(self, manifest: Manifest, excluded: set[str], chooser: PeerChooser, staging: Path, entry: Path,
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
        (staging / model_files.PEER_MARKER).write_text(json.dumps(
            {"root": manifest.root, "sources": dict(stats.bytes_by_source), "copied_at": time.time()}))
        shutil.rmtree(entry, ignore_errors=True)  # a tokenizer-only entry is superseded
        os.replace(staging, entry)
        self.state = COMPLETE
        count_transfer(self.redis, stats.bytes_by_source, stats.seconds)
        self._end_transfer("done", fetcher)
        log.info("weights: %d MB from %s in %.2f s (%d corrupt chunks fetched again)", manifest.total // 10**6,
                 ", ".join(stats.bytes_by_source), stats.seconds, stats.corrupt_chunks)
        return Obtained(entry, PEER, time.perf_counter() - started)

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


def _first_manifest(chooser: PeerChooser, sha: str, secret: str) -> tuple[Manifest, set[str]] | None:
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


@contextmanager
def entry_lock(entry: Path):
    """The lock that GGUF conversion takes too (engine.weights): one writer per entry per host
    (a model's entry, an adapter's, or the adapters' name index)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

