"""The weight data plane and its fetcher, over real HTTP on loopback: a copy is byte-equal, a
wrong key is refused, a corrupt chunk is detected and fetched again, a source that stops midway is
replaced, and a chain forwards chunks so that the source sends each byte once."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tasks.weights.fetch import ChunkFetcher, NoSource, Source, SourceGone, fetch_manifest
from tasks.weights.manifest import Manifest, build_manifest
from tasks.weights.server import KEY_HEADER, WeightServer

SECRET = "s3cret"
CHUNK = 4096
SHA = "ab" * 32


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text('{"a": 1}')  # smaller than a chunk: shares one with the next
    (directory / "model.safetensors").write_bytes(os.urandom(10 * CHUNK + 123))
    (directory / "tokenizer.json").write_bytes(os.urandom(CHUNK + 7))
    (directory / ".hidden").write_text("not served")
    return directory


@pytest.fixture
def servers():
    started = []

    def make(wait_s: float = 10.0) -> WeightServer:
        server = WeightServer("127.0.0.1", 0, SECRET, wait_s=wait_s).start()
        started.append(server)
        return server
    yield make
    for server in started:
        server.stop()


def tree(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if not p.name.startswith(".")}


def sources(*servers_):
    """A `choose` over these servers in order."""
    named = [Source(f"peer{i}", s.address) for i, s in enumerate(servers_)]
    return lambda excluded: next((s for s in named if s.name not in excluded), None)


def test_manifest_chunks_span_files(model_dir):
    manifest = build_manifest(model_dir, SHA, CHUNK)
    assert [name for name, _ in manifest.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert len(manifest.chunks) == -(-manifest.total // CHUNK) > 10
    assert Manifest.from_json(manifest.to_json()) == manifest
    first = manifest.segments(*manifest.chunk_span(0))
    assert [(s.file, s.offset) for s in first] == [(0, 0), (1, 0)] and sum(s.length for s in first) == CHUNK
    tampered = manifest.to_json().replace(manifest.chunks[3], "0" * len(manifest.chunks[3]))
    with pytest.raises(ValueError, match="root"):
        Manifest.from_json(tampered)


@pytest.mark.parametrize("checksum", ["xxh3_128", "sha256"])
def test_copy_is_byte_equal(model_dir, tmp_path, servers, checksum):
    server = servers()
    manifest = build_manifest(model_dir, SHA, CHUNK, checksum)
    assert manifest.checksum == checksum
    server.hold(manifest, model_dir)
    assert fetch_manifest(Source("peer0", server.address), SHA, SECRET) == manifest
    stats = ChunkFetcher(manifest, tmp_path / "copy", SECRET, parallel=3).run(sources(server))
    assert tree(tmp_path / "copy") == tree(model_dir)
    assert stats.bytes_by_source == {"peer0": manifest.total} and stats.corrupt_chunks == 0


def test_wrong_key_and_unknown_model_are_refused(model_dir, servers):
    server = servers()
    server.hold(build_manifest(model_dir, SHA, CHUNK), model_dir)
    with pytest.raises(SourceGone, match="401"):
        fetch_manifest(Source("peer0", server.address), SHA, "wrong")
    with pytest.raises(SourceGone, match="404"):
        fetch_manifest(Source("peer0", server.address), "cd" * 32, SECRET)


def test_corrupt_chunk_is_fetched_again_from_a_good_source(model_dir, tmp_path, servers):
    manifest = build_manifest(model_dir, SHA, CHUNK)
    corrupt_dir = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt_dir)
    with open(corrupt_dir / "model.safetensors", "r+b") as handle:  # one flipped byte in chunk 5
        handle.seek(5 * CHUNK)
        byte = handle.read(1)
        handle.seek(5 * CHUNK)
        handle.write(bytes([byte[0] ^ 0xFF]))
    bad, good = servers(), servers()
    bad.hold(manifest, corrupt_dir)  # serves the manifest of the good bytes
    good.hold(manifest, model_dir)
    stats = ChunkFetcher(manifest, tmp_path / "copy", SECRET, parallel=2).run(sources(bad, good))
    assert tree(tmp_path / "copy") == tree(model_dir)
    assert stats.corrupt_chunks >= 1 and stats.failed_sources == ["peer0"]
    assert stats.bytes_by_source["peer1"] >= CHUNK  # the bad chunk came from the good source


def test_only_a_corrupt_source_gives_no_copy(model_dir, tmp_path, servers):
    manifest = build_manifest(model_dir, SHA, CHUNK)
    with open(model_dir / "tokenizer.json", "r+b") as handle:
        handle.write(b"\0\0\0\0")
    bad = servers()
    bad.hold(manifest, model_dir)
    with pytest.raises(NoSource):
        ChunkFetcher(manifest, tmp_path / "copy", SECRET).run(sources(bad))


def test_a_source_that_stops_midway_is_replaced(model_dir, tmp_path, servers):
    """The first source has only half the chunks and then goes away: the rest comes from the second."""
    manifest = build_manifest(model_dir, SHA, CHUNK)
    dying, spare = servers(wait_s=30), servers()
    half = dying.hold(manifest, model_dir, complete=False)
    for index in range(len(manifest.chunks) // 2):
        half.mark(index)
    spare.hold(manifest, model_dir)
    threading.Timer(0.5, dying.stop).start()  # while the fetcher waits for the missing chunks
    stats = ChunkFetcher(manifest, tmp_path / "copy", SECRET, parallel=2).run(sources(dying, spare))
    assert tree(tmp_path / "copy") == tree(model_dir)
    assert stats.failed_sources == ["peer0"]
    assert stats.bytes_by_source["peer0"] >= (len(manifest.chunks) // 2 - 1) * CHUNK > 0
    assert stats.bytes_by_source["peer0"] + stats.bytes_by_source["peer1"] == manifest.total


def test_chain_forwards_chunks_as_they_arrive(model_dir, tmp_path, servers):
    """B copies from A and serves what it has; C copies from B at the same time: A sends each
    byte once, and both copies are whole."""
    manifest = build_manifest(model_dir, SHA, CHUNK)
    a, b = servers(), servers()
    a_holding = a.hold(manifest, model_dir)
    b_fetcher = ChunkFetcher(manifest, tmp_path / "b", SECRET, parallel=1)
    b_fetcher.create_files()
    b_holding = b.hold(manifest, tmp_path / "b", complete=False)
    b_fetcher.on_chunk = lambda index, *_: b_holding.mark(index)
    c_result = {}
    c_thread = threading.Thread(target=lambda: c_result.update(stats=ChunkFetcher(
        manifest, tmp_path / "c", SECRET, parallel=2).run(sources(b))))
    c_thread.start()
    b_fetcher.run(sources(a))
    c_thread.join(30)
    assert tree(tmp_path / "b") == tree(model_dir) == tree(tmp_path / "c")
    assert c_result["stats"].bytes_by_source == {"peer0": manifest.total}  # all of it from B
    assert a_holding.sent_bytes == manifest.total and b_holding.sent_bytes == manifest.total


def test_idle_connections_cannot_exhaust_the_data_plane(model_dir, tmp_path):
    """Anyone who can reach the port, secret or not, may open connections and send nothing: each
    used to hold a thread and a descriptor for ever. Past the cap a connection is closed at once;
    an idle one is closed after the idle timeout; then a peer with the secret copies the model."""
    server = WeightServer("127.0.0.1", 0, SECRET, max_connections=4, idle_timeout_s=1.0).start()
    try:
        server.hold(build_manifest(model_dir, SHA, CHUNK), model_dir)
        host, port = server.address.removeprefix("http://").split(":")
        threads = threading.active_count()
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        for _ in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                assert extra.recv(1) == b""  # closed at once: no thread, no descriptor held
        assert threading.active_count() <= threads + 4  # one per connection held, the cap
        for connection in idle:
            assert connection.recv(1) == b""  # closed by the server once idle (within the 10 s wait)
            connection.close()
        ChunkFetcher(fetch_manifest(Source("peer0", server.address), SHA, SECRET), tmp_path / "copy",
                     SECRET, parallel=2).run(sources(server))  # within the cap even while 2 manifest asks wind up
        assert tree(tmp_path / "copy") == tree(model_dir)
    finally:
        server.stop()


def test_a_slow_reader_still_gets_every_byte(tmp_path):
    """With an idle timeout the socket is non-blocking under sendfile: a reader that lets the
    socket buffer fill gets the whole range all the same."""
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(os.urandom(16 << 20))
    server = WeightServer("127.0.0.1", 0, SECRET, idle_timeout_s=10.0).start()
    try:
        manifest = server.hold(build_manifest(directory, SHA, 1 << 20), directory).manifest
        connection = http.client.HTTPConnection(*server.address.removeprefix("http://").split(":"), timeout=10)
        connection.request("GET", f"/weights/{SHA}/data", headers={KEY_HEADER: SECRET})
        response = connection.getresponse()
        time.sleep(0.3)  # the server meets a full socket buffer (the outcome is the same either way)
        body = response.read()
        assert response.status == 206 and len(body) == manifest.total
        assert hashlib.sha256(body).digest() == hashlib.sha256((directory / "model.safetensors").read_bytes()).digest()
    finally:
        server.stop()
