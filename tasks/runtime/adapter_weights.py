"""LoRA adapters through the host weight cache and the peer data plane, by content hash, so that a
replica on a host that never had an adapter's files serves the same adapters (docs/peer-weights.md).

Each adapter of `--lora-adapters` is found, in this order:
1. its source on this host (a local directory, or a hub id in the local Hugging Face cache): its
   content hash (sha256 of its two files) names its host-cache entry, `adapters/<hash>`, where it
   is copied once;
2. the host cache, by name (`adapters/names.json` remembers the hash each name had here);
3. a live replica advertising the name (its record's `weights.adapters`: name -> hash): its data
   plane serves that entry; the chunks are copied, each verified, into a staging directory that
   is renamed into this host's cache when whole.
Every replica then serves its adapters' entries on its data plane and advertises them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from common import hub
from common.adapters import AdapterSpec
from common.hub import ADAPTER_FILES, ModelUnavailable
from tasks.runtime.peer_weights import ReplicaWeights, sweep_staging
from tasks.weights.fetch import ChunkFetcher, Source, SourceGone, fetch_manifest
from tasks.weights.host_cache import entry_lock
from tasks.weights.manifest import cached_manifest
from common.replica_records import live_records

log = logging.getLogger(__name__)

NAMES_FILE = "names.json"


class AdapterUnavailable(FileNotFoundError):
    """Neither this host nor any live replica has the adapter."""


def adapter_sha(directory: Path) -> str:
    """The adapter's identity: its config and weights, hashed."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        with open(directory / name, "rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
    return digest.hexdigest()


class AdapterWeights:
    def __init__(self, weights: ReplicaWeights):
        self.weights = weights
        self.root = Path(weights.settings.weight_cache_dir) / "adapters"

    def obtain(self, spec: AdapterSpec) -> Path:
        """The adapter's host-cache entry, filled from its source, or from a peer."""
        source = _local_source(spec)
        if source is not None:
            sha = adapter_sha(source)
            entry = self._entry(sha)
            with entry_lock(entry):
                if not entry.is_dir():
                    _copy(source, entry)
        else:
            sha = self._remembered().get(spec.name)
            entry = self._entry(sha) if sha else None
            if entry is None or not entry.is_dir():
                sha, entry = self._from_peers(spec)
        self._remember(spec.name, sha)
        self._serve(spec.name, sha, entry)
        return entry

    def _entry(self, sha: str) -> Path:
        return self.root / sha[:24]

    def _from_peers(self, spec: AdapterSpec) -> tuple[str, Path]:
        holders = [r for r in live_records(self.weights.redis) if r.get("name") != self.weights.name
                   and (r.get("weights") or {}).get("addr") and ((r.get("weights") or {}).get("adapters") or {}).get(spec.name)]
        if not holders:
            raise AdapterUnavailable(f"LoRA adapter {spec.name!r}: {spec.source} is not on this host, not in its host "
                                     "cache, and no live replica serves it")
        sha = holders[0]["weights"]["adapters"][spec.name]
        sources = [Source(r["name"], r["weights"]["addr"]) for r in holders if r["weights"]["adapters"][spec.name] == sha]
        entry = self._entry(sha)
        with entry_lock(entry):
            if not entry.is_dir():
                self._fetch(spec, sha, sources, entry)
        return sha, entry

    def _fetch(self, spec: AdapterSpec, sha: str, sources: list[Source], entry: Path) -> None:
        def choose(excluded: set[str]) -> Source | None:
            return next((s for s in sources if s.name not in excluded), None)

        excluded: set[str] = set()
        while (source := choose(excluded)) is not None:
            try:
                manifest = fetch_manifest(source, sha, self.weights.secret)
                break
            except SourceGone as error:
                log.warning("LoRA adapter %s: %s", spec.name, error)
                excluded.add(source.name)
        else:
            raise AdapterUnavailable(f"LoRA adapter {spec.name!r}: no live replica could send it")
        staging = _staging(entry)
        try:
            stats = ChunkFetcher(manifest, staging, self.weights.secret, self.weights.settings.weights_parallel).run(
                lambda failed: choose(failed | excluded))
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("LoRA adapter %s: %d kB from %s in %.2f s", spec.name, manifest.total // 1000,
                 ", ".join(stats.bytes_by_source), stats.seconds)

    def _serve(self, name: str, sha: str, entry: Path) -> None:
        server = self.weights.server
        if server is None:
            return
        settings = self.weights.settings
        manifest = cached_manifest(entry, sha, settings.weights_chunk_size, True, settings.weights_checksum)
        server.hold(manifest, entry, complete=True)
        self.weights.adapters[name] = sha

    def _remembered(self) -> dict[str, str]:
        try:
            return json.loads((self.root / NAMES_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, name: str, sha: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with entry_lock(self.root / NAMES_FILE):
            names = {**self._remembered(), name: sha}
            tmp = self.root / f"{NAMES_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(names))
            os.replace(tmp, self.root / NAMES_FILE)


def _local_source(spec: AdapterSpec) -> Path | None:
    if spec.is_local:
        directory = Path(spec.source).expanduser()
        return directory if directory.is_dir() else None
    try:
        return hub.ensure_adapter(spec.source)
    except ModelUnavailable as error:
        log.info("LoRA adapter %s: not from the hub (%s); asking peers", spec.name, error)
        return None


def _staging(entry: Path) -> Path:
    """Where `entry` is written before it is renamed into place (under the entry's lock), with
    what a process that died left there swept first."""
    sweep_staging(entry)
    return entry.with_name(f"{entry.name}.staging-{os.getpid()}")


def _copy(source: Path, entry: Path) -> None:
    staging = _staging(entry)
    staging.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, staging / name)
    os.replace(staging, entry)
