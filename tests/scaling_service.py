"""The real service with a host agent (`blitzscale agent`), so that the control plane can start
replica processes: what `blitzscale serve` runs, as separate processes the tests can watch."""
from __future__ import annotations

import subprocess
import time

import requests
from celery import Celery

from common.processes import stop_process
from tests.service import Service


class ScalingService(Service):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "ScalingService":
        super().start(timeout)
        self.agent = self._spawn("agent", ["agent"])
        self.wait_for(lambda: self.cluster()["agents"], timeout=30, what="the host agent")
        return self

    def stop(self) -> None:
        if self.agent is not None:
            stop_process(self.agent, grace=30)  # the agent stops the replicas it started
        super().stop()

    def celery(self) -> Celery:
        return Celery("blitzscale-test", broker=self.env["REDIS_URL"])

    def cluster(self, celery: bool = True) -> dict:
        response = requests.get(f"{self.base_url}/cluster_state", params={"celery": str(celery).lower()}, timeout=10)
        response.raise_for_status()
        return response.json()

    def slot(self, slot: int, celery: bool = False) -> dict:
        return next((r for r in self.cluster(celery)["replicas"] if r["slot"] == slot), {"state": None})

    def modify(self, kind: str, **data) -> requests.Response:
        return requests.post(f"{self.base_url}/modify_cluster_state", json={"type": kind, "data": data}, timeout=30)

    def wait_for(self, predicate, timeout: float = 60, what: str = "a condition", interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{what} not reached in {timeout} s; logs:\n{self.logs()}")

    def wait_state(self, slot: int, state: str, timeout: float = 60) -> dict:
        return self.wait_for(lambda: (v := self.slot(slot)) and v["state"] == state and v,
                             timeout, f"slot {slot} {state}")
