"""The identity of a prepared model directory as a peer serves it: its files, in name order,
read as one byte stream cut into fixed-size chunks, each with its checksum.

`root` (the sha256 of the chunk digests, in order) names the whole content: a receiver that has
checked every chunk against the manifest and the manifest against `root` holds exactly the
source's bytes. The chunk checksum is xxh3-128 by default (it runs at memory speed, so checking
costs the copy little; the peers are authenticated by the cluster's key, so it guards against
corruption, not forgery) or sha256. Hidden files (our markers) and lock/staging leftovers are not
part of it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

DEFAULT_CHUNK_SIZE = 4 << 20
CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT_CHECKSUM = "xxh3_128"


@dataclass(frozen=True)
class Segment:
    """A part of one file that a byte range of the stream covers."""
    file: int  # index into Manifest.files
    offset: int  # in that file
    length: int


@dataclass(frozen=True)
class Manifest:
    sha: str  # the model identity it is served under (model_files.ModelSource.sha)
    files: tuple[tuple[str, int], ...]  # (name, size), in stream order
    chunk_size: int
    chunks: tuple[str, ...]  # sha256 hex of each chunk
    root: str  # sha256 of the concatenated chunk digests
    checksum: str = DEFAULT_CHECKSUM  # of each chunk: a CHECKSUMS name

    def digest(self, data) -> str:
        return CHECKSUMS[self.checksum](data).hexdigest()

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk `index` in the stream."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.total)

    def chunks_of(self, start: int, end: int) -> range:
        """The chunks that bytes [start, end) touch."""
        if end <= start:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def segments(self, start: int, end: int) -> list[Segment]:
        """Bytes [start, end) of the stream as parts of files."""
        out, file_start = [], 0
        for index, (_, size) in enumerate(self.files):
            file_end = file_start + size
            lo, hi = max(start, file_start), min(end, file_end)
            if lo < hi:
                out.append(Segment(index, lo - file_start, hi - lo))
            file_start = file_end
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data = json.loads(text)
        manifest = cls(str(data["sha"]), tuple((str(n), int(s)) for n, s in data["files"]), int(data["chunk_size"]),
                       tuple(str(c) for c in data["chunks"]), str(data["root"]), str(data.get("checksum", "sha256")))
        manifest.check()
        return manifest

    def check(self) -> None:
        """A manifest that is consistent with itself (a peer could send anything)."""
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"bad manifest: unknown checksum {self.checksum!r}")
        if self.chunk_size <= 0 or any(size < 0 for _, size in self.files):
            raise ValueError("bad manifest: sizes")
        if len(self.chunks) != -(-self.total // self.chunk_size):
            raise ValueError("bad manifest: chunk count does not match the size")
        if root_of(self.chunks) != self.root:
            raise ValueError("bad manifest: root does not match its chunks")
        for name, _ in self.files:
            if not name or "/" in name or "\\" in name or name.startswith(".") or name in ("..", "."):
                raise ValueError(f"bad manifest: file name {name!r}")


def root_of(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(bytes.fromhex(chunk))
    return digest.hexdigest()


def served_files(directory: Path) -> list[Path]:
    """The files of a prepared model directory that make up its content."""
    return sorted((p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith((".lock", ".tmp"))), key=lambda p: p.name)


def build_manifest(directory: Path, sha: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   checksum: str = DEFAULT_CHECKSUM) -> Manifest:
    """Checksum every chunk of the directory's files (read once, in order)."""
    files = served_files(directory)
    new_digest = CHECKSUMS[checksum]
    chunks, digest, filled = [], new_digest(), 0
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while True:
                read = handle.readinto(view[filled:])
                if not read:
                    break
                filled += read
                if filled == chunk_size:
                    digest.update(view)
                    chunks.append(digest.hexdigest())
                    digest, filled = new_digest(), 0
    if filled:
        digest.update(view[:filled])
        chunks.append(digest.hexdigest())
    return Manifest(sha, tuple((p.name, p.stat().st_size) for p in files), chunk_size, tuple(chunks), root_of(chunks),
                    checksum)


def cached_manifest(directory: Path, sha: str, chunk_size: int, writable: bool,
                    checksum: str = DEFAULT_CHECKSUM) -> Manifest:
    """`build_manifest`, remembered in the directory (`.manifest-<checksum>-<chunk>.json`) when it
    is ours to write (a host-cache entry, never the user's model directory)."""
    memo = directory / memo_name(checksum, chunk_size)
    try:
        manifest = Manifest.from_json(memo.read_text())
        if manifest.sha == sha and manifest.files == tuple((p.name, p.stat().st_size) for p in served_files(directory)):
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    manifest = build_manifest(directory, sha, chunk_size, checksum)
    if writable:
        try:
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(manifest.to_json())
            os.replace(tmp, memo)
        except OSError:
            pass  # an optimisation only
    return manifest


def memo_name(checksum: str, chunk_size: int) -> str:
    return f".manifest-{checksum}-{chunk_size}.json"
