"""The benchmark's handle on a scaling cluster: `blitzscale serve` on a Redis of our own (so the
benchmark can use Celery's remote control too), scaling commands, and timed streams."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import requests
from celery import Celery

from bench.http_load import stream_once
from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_process


class Cluster:
    def __init__(self, log_path, env: dict | None = None, **settings):
        self.redis = EmbeddedRedis().start()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {}), "REDIS_URL": self.redis.url}
        self.args = ["--port", str(self.port)]
        for name, value in settings.items():
            flag = f"--{name.replace('_', '-')}"
            self.args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "serve", *self.args], env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.celery = Celery("bench", broker=self.redis.url)

    def wait_ready(self, active: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"blitzscale serve exited with {self.process.returncode}")
            try:
                state = self.state()
                if state["agents"] and state["counts"]["active"] >= active:
                    return
            except (requests.ConnectionError, requests.HTTPError):
                pass
            time.sleep(0.3)
        raise TimeoutError("the cluster did not become ready")

    def wait_for_standby(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.state()["counts"]["standby"] < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} standby replicas not ready")
            time.sleep(0.2)

    def state(self, celery: bool = False) -> dict:
        response = requests.get(f"{self.base_url}/cluster_state", params={"celery": str(celery).lower()}, timeout=10)
        response.raise_for_status()
        return response.json()

    def slot(self, slot: int) -> dict:
        return next((r for r in self.state()["replicas"] if r["slot"] == slot), {"state": None})

    def wait_state(self, slot: int, state: str, timeout: float = 300, poll: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.slot(slot)
            if view["state"] == state:
                return view
            time.sleep(poll)
        raise TimeoutError(f"slot {slot} did not reach {state}")

    def modify(self, kind: str, **data) -> None:
        response = requests.post(f"{self.base_url}/modify_cluster_state", json={"type": kind, "data": data}, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"{kind} {data}: {response.status_code} {response.text}")

    def close(self) -> None:
        stop_process(self.process, grace=60)
        self.redis.stop()
        self.log.close()


class FirstToken:
    """A streaming request in a thread; `.at` is when its first token arrived (perf_counter).
    While no replica serves, the web refuses at once (424): it asks again every `retry_s`."""

    def __init__(self, base_url: str, prompt: str = "Hello", new_tokens: int = 4, retry_s: float = 0.01):
        self.at: float | None = None
        self.error: str | None = None
        self.retry_s = retry_s
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}
        self._thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self._thread.start()

    def _run(self, base_url: str, body: dict) -> None:
        deadline = time.monotonic() + 600
        while True:
            response = requests.post(f"{base_url}/generate_stream", json=body, stream=True, timeout=600)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            response.close()
            time.sleep(self.retry_s)
        with response:
            for line in response.iter_lines():
                if line.startswith(b"data:"):
                    if self.at is None:
                        self.at = time.perf_counter()
                    if b'"error"' in line[:20]:
                        self.error = line.decode()

    def wait(self, timeout: float = 600) -> float:
        self._thread.join(timeout)
        if self.at is None:
            raise RuntimeError(f"no first token: {self.error}")
        return self.at


def timed_stream(base_url: str, prompt: str, new_tokens: int, sent_at: float, out: list, lock: threading.Lock):
    """One client of a burst: appends {sent, ttft, tokens, ok}."""
    times, ok = [], False
    try:
        times, _, ok = stream_once(base_url, prompt, new_tokens)
    except requests.RequestException:
        pass
    first, tokens = (times[0] - sent_at if times else None), len(times)
    with lock:
        out.append({"sent": sent_at, "ttft": first, "tokens": tokens, "ok": ok})
