"""The weight data plane: a small HTTP server that serves the model weights a replica holds, by
content hash, to replicas on other hosts.

    GET /weights/<sha>/manifest                      the Manifest (JSON): files, chunk digests, root
    GET /weights/<sha>/data   Range: bytes=a-b       206, those bytes of the file stream (sendfile)

Every request carries the cluster's shared secret in `X-Blitz-Weights-Key` (compared in constant
time; 401 otherwise). A holding may be partial: a replica that is still receiving the weights
serves each chunk as soon as it has verified it, so the replicas of one scale-up form a chain (a
request for a chunk not yet there waits for it, up to `wait_s`, then 503). A holding of files at
rest (a host cache's, `verify`) has each chunk checked before it is sent: a corrupt one answers
500 and the model is served no more. The server binds to the replica's advertised address only
(loopback by default).

Anyone who reaches the port can connect before the key is checked, so connections are bounded:
at most `max_connections` at once (past it, one is closed at once), and one that sends or takes
nothing for `idle_timeout_s` is closed; neither threads nor descriptors run out.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tasks.weights.manifest import CHECKSUMS, Manifest

log = logging.getLogger(__name__)

KEY_HEADER = "X-Blitz-Weights-Key"
_VERIFY_PIECE = 1 << 20
MAX_CONNECTIONS = 256  # a scale-up's receivers × their parallel fetches, with room to spare
IDLE_TIMEOUT_S = 60.0  # a peer's connection between two requests (its fetcher waits as long)
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_PATH = re.compile(r"^/weights/([0-9a-zA-Z]{8,128})/(manifest|data)$")


class Holding:
    """One model's bytes that this process serves: the files of a directory (opened once, so a
    rename of the directory while serving changes nothing) and which chunks are verified."""

    def __init__(self, manifest: Manifest, directory: Path, complete: bool, verify: bool = False,
                 keep_open: bool = True):
        """`verify`: check each chunk against the manifest before sending it (files at rest, which
        may rot: a host cache's). Without `keep_open`, each request opens the files it reads (a
        host cache serves many models: a descriptor per file of each would run the process out),
        so the directory must stay where it is while served."""
        self.manifest = manifest
        self.verify = verify
        self.corrupt: int | None = None  # the first chunk found corrupt: the holding is served no more
        self.directory = directory
        self._fds = [os.open(directory / name, os.O_RDONLY) for name, _ in manifest.files] if keep_open else None
        self._have = bytearray([1 if complete else 0]) * len(manifest.chunks)
        self._missing = 0 if complete else len(manifest.chunks)
        self._changed = threading.Condition()
        self.released = False
        self.sent_bytes = 0  # bytes served to peers (what a chain saves the source)
        self.readers = 0  # requests being answered now (WeightServer.begin/end)
        self.last_read = 0.0  # monotonic time of the last request's start or end

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def mark(self, index: int) -> None:
        """Chunk `index` is written and verified: serve it."""
        with self._changed:
            if not self._have[index]:
                self._have[index] = 1
                self._missing -= 1
                self._changed.notify_all()

    def wait_for(self, chunks: range, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: self.released or all(self._have[i] for i in chunks), timeout) and not self.released

    def open_files(self, chunks: range) -> dict[int, int]:
        """Descriptors of the files these chunks span, by file index (`close_files` after)."""
        if not chunks:
            return {}
        files = {s.file for s in self.manifest.segments(self.manifest.chunk_span(chunks[0])[0],
                                                         self.manifest.chunk_span(chunks[-1])[1])}
        if self._fds is not None:
            return {index: self._fds[index] for index in files}
        opened: dict[int, int] = {}
        try:
            for index in sorted(files):
                opened[index] = os.open(self.directory / self.manifest.files[index][0], os.O_RDONLY)
        except OSError:
            self.close_files(opened)
            raise
        return opened

    def close_files(self, fds: dict[int, int]) -> None:
        if self._fds is None:
            for fd in fds.values():
                os.close(fd)

    def first_corrupt(self, chunks: range, fds: dict[int, int]) -> int | None:
        """The first of these chunks whose bytes no longer match the manifest (then `corrupt`)."""
        for index in chunks:
            digest = CHECKSUMS[self.manifest.checksum]()
            for segment in self.manifest.segments(*self.manifest.chunk_span(index)):
                for offset in range(segment.offset, segment.offset + segment.length, _VERIFY_PIECE):
                    length = min(_VERIFY_PIECE, segment.offset + segment.length - offset)
                    digest.update(os.pread(fds[segment.file], length, offset))
            if digest.hexdigest() != self.manifest.chunks[index]:
                self.corrupt = index
                return index
        return None

    def count_sent(self, nbytes: int) -> None:
        with self._changed:
            self.sent_bytes += nbytes

    def release(self) -> None:
        with self._changed:
            self.released = True
            self._changed.notify_all()
        for fd in self._fds or ():
            try:
                os.close(fd)
            except OSError:
                pass


class Pacer:
    """What all connections of one server send together stays under `rate` bytes/s (a replica
    that serves peers must not starve its own clients of network)."""

    PIECE = 256 << 10

    def __init__(self, rate: float):
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def piece(self, length: int) -> int:
        return min(length, self.PIECE) if self.rate else length

    def wait(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + nbytes / self.rate
            delay = self._next - now
        time.sleep(delay)


class WeightServer:
    def __init__(self, host: str, port: int, secret: str, wait_s: float = 30.0, max_rate: float = 0.0,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S):
        """`max_rate`: bytes/s over all peers (0: no limit)."""
        self.secret = secret.encode()
        self.wait_s = wait_s
        self.idle_timeout_s = idle_timeout_s
        self.pacer = Pacer(max_rate)
        self._holdings: dict[str, Holding] = {}
        self._lock = threading.Lock()
        self._httpd = _BoundedHTTPServer((host, port), _handler_class(self), max_connections)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "WeightServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="weight-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            holdings, self._holdings = list(self._holdings.values()), {}
        for holding in holdings:
            holding.release()

    def hold(self, manifest: Manifest, directory: Path, complete: bool = True, verify: bool = False,
             keep_open: bool = True) -> Holding:
        holding = Holding(manifest, directory, complete, verify, keep_open)
        with self._lock:
            previous = self._holdings.get(manifest.sha)
            self._holdings[manifest.sha] = holding
        if previous is not None:
            previous.release()
        return holding

    def release(self, sha: str) -> None:
        with self._lock:
            holding = self._holdings.pop(sha, None)
        if holding is not None:
            holding.release()

    def begin(self, sha: str) -> Holding | None:
        """The holding a request reads, counted as read until `end` (see `release_if_idle`)."""
        with self._lock:
            holding = self._holdings.get(sha)
            if holding is None or holding.released or holding.corrupt is not None:
                return None
            holding.readers += 1
            holding.last_read = time.monotonic()
            return holding

    def end(self, holding: Holding) -> None:
        with self._lock:
            holding.readers -= 1
            holding.last_read = time.monotonic()

    def release_if_idle(self, sha: str, idle_s: float) -> bool:
        """Stop serving `sha` unless a request reads it now or did in the last `idle_s` seconds
        (a transfer between two chunks); True when it is not served (any more)."""
        with self._lock:
            holding = self._holdings.get(sha)
            if holding is None:
                return True
            if holding.readers or time.monotonic() - holding.last_read < idle_s:
                return False
            del self._holdings[sha]
        holding.release()
        return True

    def corrupt(self) -> list[str]:
        """The models found corrupt while serving them (no longer served: see `Holding.verify`)."""
        with self._lock:
            return [sha for sha, holding in self._holdings.items() if holding.corrupt is not None]

    def last_read(self, sha: str) -> float | None:
        """Monotonic time of the last request for `sha` (None: not served, or never read)."""
        with self._lock:
            holding = self._holdings.get(sha)
            return holding.last_read or None if holding is not None else None

    def authorized(self, key: str | None) -> bool:
        return key is not None and hmac.compare_digest(key.encode(), self.secret)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refused += 1
            if self._refused in (1, 100) or self._refused % 10_000 == 0:  # a flood says so, not per connection
                log.warning("weights: %d connections refused: all %s places busy", self._refused,
                            self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler_class(server: WeightServer):
    class Handler(_WeightHandler):
        weights = server
        timeout = server.idle_timeout_s  # on every read and write of the connection
    return Handler


class _WeightHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per fetcher thread
    weights: WeightServer

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("weights %s: " + format, self.client_address[0], *args)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if not self.weights.authorized(self.headers.get(KEY_HEADER)):
            return self._error(401, "missing or wrong weights key")
        match = _PATH.match(self.path)
        if not match:
            return self._error(404, "no such path")
        holding = self.weights.begin(match.group(1))
        if holding is None:
            return self._error(404, "this replica holds no such model")
        try:
            if match.group(2) == "manifest":
                return self._send(200, holding.manifest.to_json().encode(), "application/json")
            return self._data(holding)
        finally:
            self.weights.end(holding)

    def _data(self, holding: Holding) -> None:
        total = holding.manifest.total
        match = _RANGE.match(self.headers.get("Range", f"bytes=0-{total - 1}"))
        if not match:
            return self._error(416, "Range must be bytes=a-b")
        start, end = int(match.group(1)), int(match.group(2) or total - 1) + 1
        if not 0 <= start < end <= total:
            self.close_connection = True
            return self._error(416, f"range outside 0-{total - 1}")
        chunks = holding.manifest.chunks_of(start, end)
        if not holding.wait_for(chunks, self.weights.wait_s):
            return self._error(503, "those chunks are not here (yet)")
        try:
            fds = holding.open_files(chunks)
        except OSError as error:
            return self._error(404, f"this model's files are gone here: {error.strerror}")
        try:
            if holding.verify and (bad := holding.first_corrupt(chunks, fds)) is not None:
                log.error("weights: chunk %d of %s is corrupt here; no longer served", bad, holding.manifest.sha[:12])
                return self._error(500, f"chunk {bad} is corrupt here; this model is no longer served")
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
            self.end_headers()
            for segment in holding.manifest.segments(start, end):
                self._sendfile(fds[segment.file], segment.offset, segment.length)
        finally:
            holding.close_files(fds)
        holding.count_sent(end - start)

    def _sendfile(self, fd: int, offset: int, length: int) -> None:
        sock = self.connection.fileno()
        pacer = self.weights.pacer
        while length > 0:
            try:
                sent = os.sendfile(sock, fd, offset, pacer.piece(length))
            except BlockingIOError:  # the idle timeout makes the socket non-blocking: wait until it drains
                self._wait_writable(sock)
                continue
            pacer.wait(sent)
            if sent == 0:
                raise ConnectionError("file shorter than its manifest says")
            offset += sent
            length -= sent

    def _wait_writable(self, sock: int) -> None:
        poller = select.poll()  # not select(): descriptors past 1024
        poller.register(sock, select.POLLOUT)
        if not poller.poll(self.timeout * 1000):
            raise TimeoutError(f"the peer took nothing for {self.timeout:.0f} s")

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
