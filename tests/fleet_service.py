"""A fleet of simulated hosts on this machine: Redis, the web, replica 0 on host `h0` (started
by the test, no agent), and one host agent per host (`blitzscale agent --host-name hN --devices
...`), each with its own host weight cache and its replicas' data planes on their own loopback
address. Every replica runs through the engine gate (tests.integration.gated_worker)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from common import model_files
from common.processes import stop_processes
from common.settings import Settings
from tests.scaling_service import ScalingService
from tests.service import PausableService

SOURCE_HOST = {"HOST_NAME": "h0", "WEIGHTS_HOST": "127.0.0.1"}


class FleetService(ScalingService, PausableService):
    def __init__(self, model_dir: Path, workdir: Path, hosts: dict[str, tuple[str, str]], env: dict):
        """`hosts`: name → (`--devices`, data-plane address)."""
        super().__init__(str(model_dir), workdir, env={**env, **SOURCE_HOST,
                                                       "WEIGHT_CACHE_DIR": str(workdir / "cache-h0")})
        self.hosts = hosts
        self.agents: dict[str, subprocess.Popen] = {}
        self.autoscaler: subprocess.Popen | None = None
        self.sha = model_files.resolve(Settings(model_id=str(model_dir))).sha

    def start(self, timeout: float = 120) -> "FleetService":
        PausableService.start(self, timeout)  # Redis, replica 0 on h0, the web
        for host in self.hosts:
            self.start_agent(host)
        self.wait_for(lambda: set(self.cluster(False)["agents"]) == set(self.hosts), 30, "the host agents")
        return self

    def cache(self, host: str) -> Path:
        return self.workdir / f"cache-{host}"

    def cache_entry(self, host: str) -> Path:
        return model_files.cache_entry(Settings(weight_cache_dir=str(self.cache(host))), self.sha)

    def start_agent(self, host: str) -> None:
        devices, address = self.hosts[host]
        env = {**self.env, "WEIGHT_CACHE_DIR": str(self.cache(host)), "WEIGHTS_HOST": address,
               "WEIGHT_PEERS": "prefer"}  # prefer: the tiny model is a plain directory
        self.agents[host] = self.spawn(f"agent-{host}", ["agent", "--host-name", host, "--devices", devices],
                                       env, module="tests.integration.gated_agent")

    def start_autoscaler(self, **env) -> None:
        self.autoscaler = self.spawn("autoscaler", ["autoscaler"], {**self.env, **env})

    def spawn(self, name: str, args: list[str], env: dict, module: str = "blitzscale.cli") -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill_host(self, host: str) -> None:
        """SIGKILL the agent's whole process group: the agent and every replica it started."""
        agent = self.agents.pop(host)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(30)

    def host(self, name: str) -> dict | None:
        return next((h for h in self.cluster(False)["hosts"] if h["host"] == name), None)

    def places(self, name: str) -> dict[str, int | None]:
        return {p["name"]: p["slot"] for p in (self.host(name) or {}).get("places", [])}

    def stop_slots(self, *slots: int) -> None:
        """Scale down to `stopped` (the fleet runs with `--down-target stop`) and wait until the
        hosts' agents have freed their places."""
        assert self.modify("TriggerNormalDown", stub_indices=list(slots)).status_code == 200
        for slot in slots:
            self.wait_state(slot, "stopped", timeout=90)  # a deadline: a loaded machine drains slowly
        self.wait_for(lambda: all(s not in self.places(h).values() for h in self.agents for s in slots),
                      timeout=20, what=f"the places of slots {slots} free")

    def empty_cache(self, host: str) -> None:
        shutil.rmtree(self.cache(host), ignore_errors=True)
        self.wait_for(lambda: self.host(host)["models"] == [], timeout=10, what=f"{host}'s cache empty")

    def stop(self) -> None:
        if self.autoscaler is not None:
            stop_processes([self.autoscaler], grace=10)
        stop_processes(list(self.agents.values()), grace=30)  # each stops the replicas it started
        self.agents.clear()
        super().stop()
