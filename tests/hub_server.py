"""A stand-in for the Hugging Face Hub: a real local HTTP server (point `HF_ENDPOINT` at it) that
serves model repositories from local directories, answering exactly what huggingface_hub asks:

- `GET /api/models/{repo}[/revision/{revision}]`: the repository's info (its commit `sha`, files);
- `GET /api/models/{repo}/tree/{revision}`: its files (size, git oid, LFS sha256 for weights);
- `HEAD` and `GET /{repo}/resolve/{revision}/{file}`: the file, with the headers huggingface_hub
  reads (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`/`X-Linked-Size` for LFS files), and byte ranges.

Each repository names its own commit (`commit_of`), or `commit` when set; the older commits of
`history` have their own files (a branch that moved on). `cut_first_download` makes the first GET of a file send half of it and drop the connection, as a
flaky network does; `rate` (bytes/s per download, 0: no limit) makes it a slow source (the
benchmarks' remote hub); `requests` records every request (method, path, Range) for the tests.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # salts each repository's commit


def commit_of(repo: str) -> str:
    """A repository's commit: its own (a commit names one tree; the host cache keys a hub model by it)."""
    return hashlib.sha1(f"{COMMIT}:{repo}".encode()).hexdigest()


LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class StandInHub:
    repos: dict[str, Path]  # repo id -> the directory whose files it holds
    cut_first_download: set[str] = field(default_factory=set)  # file names
    requests: list[Seen] = field(default_factory=list)
    rate: float = 0.0  # bytes/s per download (0: no limit)
    commit: str | None = None  # what every revision but those of `history` names (None: each repo's own)
    history: dict[str, Path] = field(default_factory=dict)  # older commits → their files (a branch that moved)

    def __post_init__(self):
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="stand-in-hub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StandInHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def downloads(self, name: str) -> list[Seen]:
        """The GETs of a repository file (each download, and each resumed part of one)."""
        return [r for r in self.requests if r.method == "GET" and re.search(rf"/resolve/[^/]+/{re.escape(name)}$", r.path)]

    def should_cut(self, name: str) -> bool:
        with self._lock:
            if name in self.cut_first_download and name not in self._cut_done:
                self._cut_done.add(name)
                return True
        return False


def _file_entry(path: Path, name: str) -> dict:
    data = path.read_bytes()
    entry = {"type": "file", "path": name, "size": len(data),
             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _handler(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the tests read `hub.requests`
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Seen(self.command, path, self.headers.get("Range")))
            api = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?:revision|tree)/(?P<rev>[^/]+))?", path)
            resolve = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            repo = (api or resolve).group("repo") if (api or resolve) else None
            if repo not in hub.repos:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            revision = (api or resolve).group("rev")
            self.commit = revision if revision in hub.history else hub.commit or commit_of(repo)
            directory = hub.history.get(revision, hub.repos[repo])
            files = sorted(p.name for p in directory.iterdir() if p.is_file())
            if api and "/tree/" in path:
                return self._json(200, [_file_entry(directory / f, f) for f in files])
            if api:
                return self._json(200, {"id": repo, "modelId": repo, "sha": self.commit, "private": False,
                                        "siblings": [{"rfilename": f} for f in files]})
            name = resolve.group("file")
            if name not in files:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            self._file(directory / name, name, body, self.commit)

        def _file(self, path: Path, name: str, body: bool, commit: str) -> None:
            data = path.read_bytes()
            entry = _file_entry(path, name)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match:
                start = int(match.group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if "lfs" in entry:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            if not start and hub.should_cut(name):  # half of it, then the connection drops
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send_paced(memoryview(data)[start:])

        def _send_paced(self, data: memoryview) -> None:
            piece = max(1, int(hub.rate / 20)) if hub.rate else len(data) or 1
            for offset in range(0, len(data), piece):
                self.wfile.write(data[offset:offset + piece])
                if hub.rate:
                    time.sleep(piece / hub.rate)

        def _json(self, status: int, payload, headers: dict | None = None) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

    return Handler
