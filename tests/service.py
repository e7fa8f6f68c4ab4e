"""Run the real service for tests: Redis, replica worker processes and gunicorn, each its own
process, on loopback ports; every process is stopped by its id at the end."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_processes


class Service:
    replica_module = "blitzscale.cli"  # a test's subclass may run the worker through a wrapper

    def __init__(self, model_id: str, workdir: Path, env: dict | None = None, replicas: int = 1,
                 redis_password: str | None = None, redis: EmbeddedRedis | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = redis or EmbeddedRedis(password=redis_password)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "MODEL_ID": model_id,
            "PORT": str(self.port),
            "HOSTNAME": "127.0.0.1",
            "LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",  # the service must never need a model hub
            **(env or {}),
        }
        self.initial_replicas = replicas
        self.web: subprocess.Popen | None = None
        self.replicas: dict[int, subprocess.Popen] = {}

    def start(self, timeout: float = 120) -> "Service":
        self.redis.start()
        self.env["REDIS_URL"] = self.redis.url
        for slot in range(self.initial_replicas):
            self.start_replica(slot)
        self.web = self._spawn("web", ["web"])
        self.wait_healthy(timeout)
        return self

    def _spawn(self, name: str, args: list[str], module: str = "blitzscale.cli") -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_replica(self, slot: int) -> subprocess.Popen:
        process = self._spawn(f"replica{slot}", ["worker", "--slot", str(slot)], self.replica_module)
        self.replicas[slot] = process
        return process

    def kill_replica(self, slot: int, sig: int = signal.SIGKILL) -> None:
        process = self.replicas.pop(slot)
        process.send_signal(sig)
        process.wait(30)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if requests.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow under load
                pass
            time.sleep(0.3)
        raise TimeoutError(f"service not healthy in {timeout} s; logs:\n{self.logs()}")

    @contextmanager
    def running(self, active_replicas: int = 0) -> Iterator["Service"]:
        """Started (and, with `active_replicas`, that many replicas active); stopped at the end,
        whatever happened (a fixture's `with Service(...).running() as svc: yield svc`)."""
        try:
            self.start()
            if active_replicas:
                self.wait_for_replicas(active_replicas)
            yield self
        finally:
            self.stop()

    def wait_for_replicas(self, count: int, timeout: float = 60) -> None:
        """Until `count` replicas are active, as /cluster_state shows them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = requests.get(f"{self.base_url}/cluster_state?celery=false", timeout=10).json()
            if sum(r["state"] == "active" for r in state["replicas"]) >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{count} replicas not active in {timeout} s; logs:\n{self.logs()}")

    def _check_alive(self) -> None:
        for name, process in [("web", self.web)] + [(f"replica{s}", p) for s, p in self.replicas.items()]:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; logs:\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        stop_processes([p for p in [self.web, *self.replicas.values()] if p is not None], grace=20)
        self.replicas.clear()
        self.redis.stop()


class PausableService(Service):
    """Its replicas run through tests.integration.gated_worker: `pause_engine` holds every
    engine before its next step until `resume_engine`, so a test controls when generation
    happens instead of guessing how fast this machine generates."""

    replica_module = "tests.integration.gated_worker"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.env["ENGINE_GATE"] = str(self.gate)

    @property
    def gate(self) -> Path:
        return self.workdir / "engine.gate"

    def pause_engine(self) -> None:
        self.gate.touch()

    def resume_engine(self) -> None:
        self.gate.unlink(missing_ok=True)

    def stop(self) -> None:
        self.resume_engine()  # a paused engine would hold the replicas' warm shutdown
        super().stop()
