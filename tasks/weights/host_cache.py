"""A host's weight cache (docs/host-cache.md): the prepared models of one host, `models/<hash>`
under `--weight-cache-dir`, kept within `--host-cache-bytes` by evicting the least recently used
entry that nobody uses. No torch, no Celery: the host agent runs it.

- **Pinned**: a replica of this host that maps an entry holds a shared `flock` on the entry's pin
  file (`models/<hash>.pin`) for its whole life; the kernel drops it when the process dies, so a
  crashed replica never leaves an entry pinned for ever.
- **Last use**: the pin file's mtime, touched when a replica pins the entry and when the agent's
  data plane serves it to another host.
- **Eviction** takes the pin's lock exclusively and the entry's writer lock (the one a copy or a
  GGUF conversion holds), both without waiting: either held means the entry is in use, and it is
  skipped. Holding both, it renames the entry away (a replica starting meanwhile waits for the
  pin, then finds no entry and fetches the model) and deletes it. The pin files stay (a lock
  file deleted while someone waits on it would let two processes hold "the" lock).
- **The bound** counts complete entries and copies in progress (staging directories; one left by
  a killed writer is swept, its writer lock being free). Pinned entries are never evicted, so the
  cache exceeds the bound only by what live replicas map.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import model_files
from tasks.weights.manifest import cached_manifest, served_files

log = logging.getLogger(__name__)

PIN_SUFFIX = ".pin"
IDENTITY = ".model.json"  # in an entry: the model's full hash (the entry is named by its prefix)


@dataclass(frozen=True)
class CacheEntry:
    name: str  # the directory's name: the model hash's prefix
    path: Path
    size: int  # bytes on disk
    last_used: float  # epoch seconds
    sha: str | None  # the full model hash, when the entry says it


class HostCache:
    def __init__(self, cache_dir: str | Path, limit: int = 0):
        """`limit`: bytes (0: no bound)."""
        self.models = Path(cache_dir) / "models"
        self.limit = limit
        self._over = False

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, least recently used first."""
        try:
            children = list(self.models.iterdir())
        except OSError:
            return []
        found = []
        for path in children:
            if "." in path.name or not path.is_dir() or not model_files.entry_complete(path):
                continue
            try:
                found.append(CacheEntry(path.name, path, _size(path), _last_used(path), entry_sha(path)))
            except OSError:  # evicted while we looked
                continue
        return sorted(found, key=lambda e: (e.last_used, e.name))

    def usage(self) -> int:
        """Bytes the bound counts: complete entries and copies in progress."""
        try:
            children = list(self.models.iterdir())
        except OSError:
            return 0
        total = 0
        for path in children:
            if path.is_dir() and (".staging-" in path.name or "." not in path.name):
                try:
                    total += _size(path)
                except OSError:
                    continue
        return total

    def evict(self, extra: int = 0, duplicated: set[str] = frozenset(),
              may_evict: Callable[[CacheEntry], bool] = lambda entry: True) -> list[str]:
        """Evict entries until the cache plus `extra` bytes fits the bound: those another host
        also holds (`duplicated`, full hashes) first, then the least recently used; never a pinned
        entry, one being written, or one `may_evict` refuses (the agent's data plane serving it).
        Returns the names evicted."""
        if not self.limit:
            return []
        excess = self.usage() + extra - self.limit
        evicted = []
        for entry in sorted(self.entries(), key=lambda e: (e.sha not in duplicated, e.last_used, e.name)):
            if excess <= 0:
                break
            if self._evict_one(entry, may_evict):
                evicted.append(entry.name)
                excess -= entry.size
        if (excess > 0) != self._over:  # said once when it goes over, once when it is back under
            self._over = excess > 0
            log.info("host cache: %s", f"{excess} bytes over its bound of {self.limit}: every entry left is in use"
                     if self._over else "back within its bound")
        return evicted

    def remove(self, entry: CacheEntry, may_remove: Callable[[CacheEntry], bool] = lambda entry: True) -> bool:
        """Remove one entry whatever the bound (a corrupt one), on the same terms as eviction."""
        return self._evict_one(entry, may_remove)

    def _evict_one(self, entry: CacheEntry, may_evict: Callable[[CacheEntry], bool]) -> bool:
        with _try_lock(pin_path(entry.path)) as unpinned, _try_lock(lock_path(entry.path)) as unwritten:
            if not (unpinned and unwritten) or not model_files.entry_complete(entry.path) or not may_evict(entry):
                return False
            doomed = entry.path.with_name(f"{entry.name}.evicted-{os.getpid()}")
            os.replace(entry.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("host cache: evicted %s (%d MB, last used %.0f s ago)", entry.name, entry.size // 10**6,
                 time.time() - entry.last_used)
        return True

    def sweep(self) -> None:
        """Directories left by a process killed midway: an eviction's, and a copy's or a
        conversion's staging directory whose writer lock nobody holds (the bound counts a copy
        in progress; one whose writer died would hold its room for ever)."""
        for leftover in self.models.glob("*.evicted-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for staging in self.models.glob("*.staging-*"):
            entry = staging.with_name(staging.name.split(".staging-")[0])
            with _try_lock(lock_path(entry)) as unwritten:
                if unwritten:
                    log.info("host cache: removing %s (left by a process that died)", staging.name)
                    shutil.rmtree(staging, ignore_errors=True)


class Pin:
    """A shared lock on an entry's pin file: while held, the entry is not evicted."""

    def __init__(self, entry: Path):
        entry.parent.mkdir(parents=True, exist_ok=True)
        self.path = pin_path(entry)
        self._handle = open(self.path, "a")
        fcntl.flock(self._handle, fcntl.LOCK_SH)  # waits only for an eviction in progress
        touch(entry)

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def touch(entry: Path) -> None:
    """Mark the entry used now (its pin file's mtime)."""
    path = pin_path(entry)
    try:
        path.touch()
    except OSError:
        pass


def pin_path(entry: Path) -> Path:
    return entry.with_name(entry.name + PIN_SUFFIX)


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


@contextmanager
def entry_lock(entry: Path):
    """One writer per entry per host (a model's entry, an adapter's, or the adapters' name
    index); a GGUF conversion takes it too (engine.weights), and eviction tries it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(entry), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _try_lock(path: Path):
    """An exclusive lock without waiting: yields whether it was taken."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def entry_sha(entry: Path) -> str | None:
    """The full model hash of an entry: its identity file, else a manifest memo a replica wrote."""
    for path in [entry / IDENTITY, *sorted(entry.glob(".manifest-*.json"))]:
        try:
            sha = str(json.loads(path.read_text())["sha"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if sha.startswith(entry.name):
            return sha
    return None


def write_identity(directory: Path, sha: str) -> None:
    (directory / IDENTITY).write_text(json.dumps({"sha": sha}))


def keep_copy(directory: Path, entry: Path, sha: str, chunk_size: int, checksum: str) -> bool:
    """Copy a model directory (its source, read once) into the host cache as `entry`, so that
    the next cold start anywhere in the cluster takes it from here. False when it is there
    already. Staged and renamed whole, like every entry."""
    with entry_lock(entry):
        if model_files.entry_complete(entry):
            return False
        staging = entry.with_name(f"{entry.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            for path in served_files(directory):
                shutil.copyfile(path, staging / path.name)  # follows a hub snapshot's links to its blobs
            manifest = cached_manifest(staging, sha, chunk_size, writable=True, checksum=checksum)
            write_identity(staging, sha)
            (staging / model_files.PEER_MARKER).write_text(json.dumps(
                {"root": manifest.root, "sources": {"source": manifest.total}, "copied_from": str(directory),
                 "copied_at": time.time()}))
            shutil.rmtree(entry, ignore_errors=True)  # a tokenizer-only entry is superseded
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    touch(entry)  # a new entry is the most recently used
    return True


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _last_used(entry: Path) -> float:
    try:
        return pin_path(entry).stat().st_mtime
    except OSError:
        return entry.stat().st_mtime
