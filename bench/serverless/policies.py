"""The three policies of the issue, each run as a fleet on this machine: Redis, the web, the
autoscaler, and two simulated hosts (agents `h0` and `h1`, `--devices cpu,cpu` each: 2 hosts × 2
places, as bench/fleet.py simulates them: each its own host cache, Hugging Face cache and data-plane
address). The models are hub repositories on a stand-in hub with a bandwidth cap (the source: a
download), so a cold start from the source costs what a download of that size costs.

- (a) `pinned`: one replica per model, never stopped; as many models as places (4), the others
  refused (unknown model).
- (b) `local`: every model, `--min-replicas 0 --scale-to-zero-after`, weights from the source on
  the chosen host (each host downloads into its own cache once; no peers, no host cache shared:
  ServerlessLLM-style local load).
- (c) `cluster`: the same scaling, weights from a live replica, then any host's cache over the
  network (`--host-cache-bytes`, LRU), then the source.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.common import preboot_setting, prebooted_ready
from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_processes

HOSTS = {"h0": ("cpu,cpu", "127.0.0.2"), "h1": ("cpu,cpu", "127.0.0.3")}
PLACES = sum(len(devices.split(",")) for devices, _ in HOSTS.values())


@dataclass(frozen=True)
class Policy:
    name: str  # a | b | c
    title: str
    env: dict = field(default_factory=dict)
    pinned: bool = False  # serve only as many models as places


def policies(scale_to_zero_after: float, host_cache_bytes: int) -> list[Policy]:
    scaling = {"MIN_REPLICAS": "0", "SCALE_TO_ZERO_AFTER": str(scale_to_zero_after)}
    return [
        Policy("a", "(a) one replica per model, pinned", {"MIN_REPLICAS": "1", "MAX_REPLICAS": "1",
                                                          "NUM_REPLICAS": "1"}, pinned=True),
        Policy("b", "(b) scale to zero, cold starts from the source on the chosen host",
               {**scaling, "WEIGHT_PEERS": "off", "HOST_CACHE_BYTES": "0"}),
        Policy("c", "(c) scale to zero, cluster-wide host cache + peers + LRU",
               {**scaling, "WEIGHT_PEERS": "auto", "HOST_CACHE_BYTES": str(host_cache_bytes)}),
    ]


class Fleet:
    """One policy's fleet; `close()` stops every process it started, by its id."""

    def __init__(self, policy: Policy, models: dict[str, str], hub_url: str, workdir: Path, queue_timeout: float):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        served = dict(list(models.items())[:PLACES]) if policy.pinned else models
        self.redis = EmbeddedRedis().start()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "PORT": str(self.port), "HOSTNAME": "127.0.0.1",
                    "MODELS": ",".join(f"{name}={repo}" for name, repo in served.items()),
                    "MODEL_ID": next(iter(served.values())), "HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "HF_HOME": str(workdir / "hf-web"), "QUEUE_TIMEOUT": str(queue_timeout),
                    "DOWN_TARGET": "stop", "HEARTBEAT_TTL": "3", "MAX_REPLICAS": "2", "LOG_LEVEL": "INFO",
                    # every policy: cold starts in pre-booted processes, one per place (an eviction
                    # frees either of a host's places; docs/scaling.md, "Pre-booted processes")
                    "PREBOOT": str(PLACES // len(HOSTS)),
                    **policy.env}
        self.processes: dict[str, subprocess.Popen] = {}
        self.ready_replicas = len(served) if policy.pinned else 0  # (a) starts warm; (b), (c) at zero

    def start(self, timeout: float = 600) -> "Fleet":
        self.spawn("web", ["web"])
        for host, (devices, address) in HOSTS.items():
            self.spawn(f"agent-{host}", ["agent", "--host-name", host, "--devices", devices], HOST_NAME=host,
                       WEIGHTS_HOST=address, WEIGHT_CACHE_DIR=str(self.workdir / f"cache-{host}"),
                       HF_HOME=str(self.workdir / f"hf-{host}"))
        self.spawn("autoscaler", ["autoscaler"])
        self.wait(lambda: self._get("/health") == 200, "the web healthy", timeout)
        self.wait(lambda: self.active_replicas() >= self.ready_replicas, "the pinned replicas active", timeout)
        # every policy's cold starts take pre-booted processes (booted before the trace): the
        # comparison stays about where the weights come from
        preboot = preboot_setting(self.env)
        self.wait(lambda: (hosts := self._state().get("hosts")) and prebooted_ready(hosts, preboot),
                  "the agents' pre-booted processes ready", timeout)
        return self

    def _state(self) -> dict:
        try:
            return requests.get(f"{self.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
        except (requests.RequestException, ValueError):
            return {}

    def active_replicas(self) -> int:
        return sum(replica.get("state") == "active" for replica in self._state().get("replicas", []))

    def spawn(self, name: str, args: list[str], **env) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", *args],
                                                env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _get(self, path: str) -> int | None:
        try:
            return requests.get(f"{self.base_url}{path}", timeout=5).status_code
        except requests.RequestException:
            return None

    def metrics(self) -> str:
        try:
            return requests.get(f"{self.base_url}/metrics", timeout=10).text
        except requests.RequestException:
            return ""

    def wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}; see {self.workdir}")
            time.sleep(0.2)
        raise TimeoutError(f"{what} not reached in {timeout} s; see {self.workdir}")

    def close(self) -> None:
        stop_processes(list(self.processes.values()), grace=60)  # the agents stop their replicas
        self.processes.clear()
        self.redis.stop()
