"""Where a model's files are, without loading torch (the web uses this for the tokenizer).

A model id is one of: a local directory (config.json + safetensors + tokenizer.json), a local
`.gguf` file, or a Hugging Face model id in the local Hugging Face cache (`common.hub` downloads
it there first; this module never reaches the network).
A GGUF model is converted once per host into the weight cache (`engine.weights` does that);
its prepared directory is keyed by the GGUF file's content hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common import hub
from common.hub import ModelUnavailable, cached_snapshot
from common.settings import Settings

_HASH_CHUNK = 8 << 20
PEER_MARKER = ".peer.json"  # in a host-cache entry copied from a peer: where from, its root hash


DOWNLOAD = "download"


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # as the user gave it (shown in /info)
    kind: str  # "directory" | "gguf" | "download" (a hub model this host has not downloaded: no path yet)
    path: Path  # the directory, or the .gguf file
    sha: str  # content hash of a gguf file; a snapshot/file-set hash for a directory; a hub model's commit

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"

    @property
    def is_download(self) -> bool:
        return self.kind == DOWNLOAD


def resolve(settings: Settings) -> ModelSource:
    model_id = settings.model_id
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(model_id, "gguf", path.resolve(), file_sha256(path))
    if path.is_dir():
        return ModelSource(model_id, "directory", path.resolve(), _directory_sha(path))
    snapshot = cached_snapshot(model_id, settings.revision) if model_id.count("/") == 1 else None
    if snapshot is not None:
        return ModelSource(model_id, "directory", snapshot, snapshot.name)
    raise ModelUnavailable(
        f"model {model_id!r} is neither a local directory, a .gguf file, nor in the local Hugging Face "
        f"cache: `blitzscale download-weights {model_id}` (or `serve`, `prepare`) downloads a hub model"
    )


def resolve_for_start(settings: Settings) -> ModelSource:
    """`resolve`, except for a hub model whose weights this host lacks: named by its commit (asked
    of the hub, no file downloaded), so that a replica can take the weights from a peer or a host
    cache before it downloads them (docs/host-cache.md)."""
    if hub.is_hub_id(settings.model_id):
        snapshot = cached_snapshot(settings.model_id, settings.revision)
        if snapshot is None or not hub.has_weights(snapshot):
            return ModelSource(settings.model_id, DOWNLOAD, Path(), hub.remote_commit(settings.model_id,
                                                                                      settings.revision))
    return resolve(settings)


def prepared_dir(settings: Settings, source: ModelSource | None = None) -> Path:
    """The directory a replica loads with transformers: the model's own directory, or the
    host-cache entry of a converted GGUF file (which may not exist yet)."""
    source = source or resolve(settings)
    if not source.is_gguf:
        return source.path
    return cache_entry(settings, source.sha)


def cache_entry(settings: Settings, sha: str) -> Path:
    """The host-cache directory of a model (a converted GGUF file, or a copy from a peer)."""
    return Path(settings.weight_cache_dir) / "models" / sha[:24]


def entry_complete(entry: Path) -> bool:
    """An entry appears whole (renamed from its staging directory): the weights of a conversion,
    or the marker of a verified copy from a peer (a tokenizer-only entry is not complete)."""
    return (entry / "model.safetensors").is_file() or (entry / PEER_MARKER).is_file()


def tokenizer_path(settings: Settings) -> Path:
    path = prepared_dir(settings) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json for {settings.model_id!r} at {path}: "
            "run `blitzscale prepare` (or `blitzscale serve`, which prepares it) first"
        )
    return path


def file_sha256(path: Path) -> str:
    """Content hash of a file; remembered beside the weight cache by (path, size, mtime)."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blitzscale" / "hashes.json"
    memo = _read_json(memo_file)
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    memo[memo_key] = digest.hexdigest()
    _write_json_atomic(memo_file, memo)
    return memo[memo_key]


def _directory_sha(path: Path) -> str:
    """A cheap identity for a model directory: its config and the names and sizes of its files."""
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for child in sorted(path.iterdir()):
        if child.is_file():
            digest.update(f"{child.name}:{child.stat().st_size}".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # the memo is an optimisation only
