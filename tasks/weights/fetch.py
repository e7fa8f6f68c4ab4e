"""The receiving side of the weight data plane: pull a model's chunks from peers, in parallel
ranges, into a staging directory, checking each chunk against the manifest.

A source that fails (refused, reset, 404, a chunk it never sends) is dropped and the chunk is
asked of the next source; a chunk whose digest is wrong is fetched again (a source that sends
`MAX_CORRUPT` bad chunks is dropped). When no source is left the fetch raises `NoSource`, and the
caller prepares the model itself. The staging directory is the caller's to rename or delete.
"""
from __future__ import annotations

import collections
import http.client
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from tasks.weights.manifest import Manifest
from tasks.weights.server import KEY_HEADER

log = logging.getLogger(__name__)

MAX_CORRUPT = 3  # bad chunks from one source before it is dropped
READ_TIMEOUT_S = 60.0  # > the server's wait for a chunk a chain predecessor does not have yet


class SourceGone(Exception):
    """A source that cannot (or can no longer) give us its chunks."""


class NoSource(Exception):
    """Every source failed before the model was complete."""


@dataclass(frozen=True)
class Source:
    name: str  # a replica's name, or `host-cache@<host>` for an agent's cache: for logs and metrics
    url: str  # its data plane, http://host:port
    host: str | None = None  # the host it runs on


@dataclass
class FetchStats:
    bytes_by_source: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    corrupt_chunks: int = 0
    failed_sources: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _connection(url: str, timeout: float = READ_TIMEOUT_S) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def fetch_manifest(source: Source, sha: str, secret: str, timeout: float = 10.0) -> Manifest:
    connection = _connection(source.url, timeout)
    try:
        connection.request("GET", f"/weights/{sha}/manifest", headers={KEY_HEADER: secret})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SourceGone(f"{source.name}: manifest answered {response.status}")
        manifest = Manifest.from_json(body)
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise SourceGone(f"{source.name}: {error}") from error
    finally:
        connection.close()
    if manifest.sha != sha:
        raise SourceGone(f"{source.name}: manifest of another model")
    return manifest


class ChunkFetcher:
    """`choose(excluded)` gives the next source to try (or None: no more), and may wait for one.
    `on_chunk(index, nbytes, source)` runs once per chunk written and verified."""

    def __init__(self, manifest: Manifest, staging: Path, secret: str, parallel: int = 4,
                 on_chunk: Callable[[int, int, str], None] | None = None):
        self.manifest = manifest
        self.staging = staging
        self.secret = secret
        self.parallel = max(1, parallel)
        self.on_chunk = on_chunk or (lambda *_: None)
        self.stats = FetchStats()
        self._pending = collections.deque(range(len(manifest.chunks)))
        self._left = len(manifest.chunks)
        self._lock = threading.Lock()
        self._source: Source | None = None
        self._failed: set[str] = set()
        self._strikes: collections.Counter = collections.Counter()
        self._abort = threading.Event()
        self._fds: list[int] = []

    @property
    def current_source(self) -> Source | None:
        return self._source

    def create_files(self) -> None:
        """Every file at its final size, so that chunks land anywhere in any order."""
        self.staging.mkdir(parents=True, exist_ok=True)
        for name, size in self.manifest.files:
            fd = os.open(self.staging / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, size)
            self._fds.append(fd)

    def run(self, choose: Callable[[set[str]], Source | None]) -> FetchStats:
        started = time.perf_counter()
        self._choose = choose
        if not self._fds:
            self.create_files()
        try:
            threads = [threading.Thread(target=self._worker, name=f"weight-fetch-{i}", daemon=True)
                       for i in range(self.parallel)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        self.stats.seconds = time.perf_counter() - started
        if self._left:
            raise NoSource(f"{self._left} of {len(self.manifest.chunks)} chunks missing; sources failed: "
                           f"{', '.join(self.stats.failed_sources) or 'none found'}")
        return self.stats

    def _worker(self) -> None:
        buffer = memoryview(bytearray(self.manifest.chunk_size))
        connections: dict[str, http.client.HTTPConnection] = {}
        try:
            while not self._abort.is_set():
                index = self._next_chunk()
                if index is None:
                    return
                source = self._current_source()
                if source is None:
                    self._give_back(index)
                    self._abort.set()
                    return
                try:
                    view = self._get(connections, source, index, buffer)
                except SourceGone as error:
                    connections.pop(source.name, None)
                    self._drop(source, str(error))
                    self._give_back(index)
                    continue
                if self.manifest.digest(view) != self.manifest.chunks[index]:
                    self._corrupt(source, index)
                    self._give_back(index)
                    continue
                self._write(index, view)
                with self._lock:
                    self._left -= 1
                    self.stats.bytes_by_source[source.name] += len(view)
                self.on_chunk(index, len(view), source.name)
        finally:
            for connection in connections.values():
                connection.close()

    def _next_chunk(self) -> int | None:
        with self._lock:
            return self._pending.popleft() if self._pending else None

    def _give_back(self, index: int) -> None:
        with self._lock:
            self._pending.appendleft(index)  # first again: a chain successor waits for it

    def _current_source(self) -> Source | None:
        with self._lock:
            while self._source is None or self._source.name in self._failed:
                candidate = self._choose(set(self._failed))
                if candidate is None:
                    return None
                try:
                    if fetch_manifest(candidate, self.manifest.sha, self.secret).root != self.manifest.root:
                        raise SourceGone(f"{candidate.name}: its content differs (another root)")
                    self._source = candidate
                    log.info("weights: fetching from %s (%s)", candidate.name, candidate.url)
                except SourceGone as error:
                    self._mark_failed(candidate, str(error))
            return self._source

    def _drop(self, source: Source, why: str) -> None:
        with self._lock:
            self._mark_failed(source, why)

    def _mark_failed(self, source: Source, why: str) -> None:
        if source.name not in self._failed:
            log.warning("weights: source %s dropped: %s", source.name, why)
            self._failed.add(source.name)
            self.stats.failed_sources.append(source.name)

    def _corrupt(self, source: Source, index: int) -> None:
        with self._lock:
            self.stats.corrupt_chunks += 1
            self._strikes[source.name] += 1
            log.warning("weights: chunk %d from %s failed its checksum; fetching it again", index, source.name)
            if self._strikes[source.name] >= MAX_CORRUPT:
                self._mark_failed(source, f"{MAX_CORRUPT} corrupt chunks")

    def _get(self, connections: dict, source: Source, index: int, buffer: memoryview) -> memoryview:
        start, end = self.manifest.chunk_span(index)
        size = end - start
        connection = connections.get(source.name)
        if connection is None:
            connection = connections[source.name] = _connection(source.url)
        try:
            connection.request("GET", f"/weights/{self.manifest.sha}/data",
                               headers={KEY_HEADER: self.secret, "Range": f"bytes={start}-{end - 1}"})
            response = connection.getresponse()
            if response.status != 206 or response.length != size:
                response.read()
                raise SourceGone(f"answered {response.status} ({response.length} bytes) for chunk {index}")
            got = 0
            while got < size:
                read = response.readinto(buffer[got:size])
                if not read:
                    raise SourceGone(f"chunk {index} cut short at {got} of {size} bytes")
                got += read
            return buffer[:size]
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise SourceGone(str(error) or type(error).__name__) from error

    def _write(self, index: int, view: memoryview) -> None:
        start, end = self.manifest.chunk_span(index)
        position = 0
        for segment in self.manifest.segments(start, end):
            part = view[position:position + segment.length]
            written = 0
            while written < segment.length:
                written += os.pwrite(self._fds[segment.file], part[written:], segment.offset + written)
            position += segment.length
