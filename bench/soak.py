"""Soak: N concurrent clients for M minutes against the real service (Redis, replica workers and
gunicorn, each its own process, on loopback), mixed streaming and non-streaming requests, with a
replica SIGKILLed and restarted in the middle. Prints requests sent / succeeded / failed (by
reason), lost (no answer at all: must be 0) and the RSS of every process at start and end.

    .venv/bin/python -m bench.soak --clients 8 --minutes 1.5
    .venv/bin/python -m bench.soak --model-id /path/to/model --clients 16 --minutes 5
    .venv/bin/python -m bench.soak --burst      # bursts at 1x, 2x, 4x the concurrency limit

Bounded: at most --max-requests requests and --minutes of load (plus the in-flight requests'
own deadline), and every process it starts is stopped by its id at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_processes

PROMPTS = ["The capital of France is", "Once upon a time", "Write a haiku about the sea.",
           "List three prime numbers:", "Explain continuous batching in one sentence.", "Hello, my name is"]
FAST_FAILOVER = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "REPLICA_CHECK_INTERVAL": "0.5",
                 "QUEUE_TIMEOUT": "60", "REPLICA_SILENCE_TIMEOUT": "30", "REQUEST_TIMEOUT": "120"}


class Cluster:
    """Redis, `replicas` replica workers and the web, started from the CLI like `serve` does."""

    def __init__(self, model_id: str | None, replicas: int, web_workers: int, workdir: Path,
                 env: dict | None = None):
        self.workdir = workdir
        self.redis = EmbeddedRedis()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_FAILOVER, "PORT": str(self.port), "HOSTNAME": "127.0.0.1",
                    "WEB_WORKERS": str(web_workers), "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "WARNING", **(env or {})}
        if model_id:
            self.env["MODEL_ID"] = model_id
        self.slots = replicas
        self.replicas: dict[int, subprocess.Popen] = {}
        self.web: subprocess.Popen | None = None

    def start(self) -> "Cluster":
        self.redis.start()
        self.env["REDIS_URL"] = self.redis.url
        for slot in range(self.slots):
            self.start_replica(slot)
        self.web = self._spawn("web", ["web"])
        self.wait_ready(self.slots, 600)
        return self

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "blitzscale.cli", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_replica(self, slot: int) -> None:
        self.replicas[slot] = self._spawn(f"replica{slot}", ["worker", "--slot", str(slot)])

    def kill_replica(self, slot: int) -> None:
        process = self.replicas.pop(slot)
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def active_replicas(self) -> int:
        import redis

        from common.keys import replica_key_pattern

        connection = redis.Redis.from_url(self.redis.url)
        keys = list(connection.scan_iter(match=replica_key_pattern()))
        return sum(json.loads(v).get("state") == "active" for v in connection.mget(keys) if v) if keys else 0

    def wait_ready(self, replicas: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                healthy = requests.get(f"{self.base_url}/health", timeout=10).status_code == 200
            except requests.RequestException:  # not listening yet, or busy starting
                healthy = False
            if healthy and self.active_replicas() >= replicas:
                return
            time.sleep(0.5)
        raise TimeoutError(f"not ready in {timeout} s: see the logs in {self.workdir}")

    def processes(self) -> dict[str, int]:
        """name -> pid of every process of the service (gunicorn's workers included)."""
        found = {"redis": self.redis.process.pid, "web (gunicorn master)": self.web.pid}
        for n, pid in enumerate(children(self.web.pid)):
            found[f"web worker {n}"] = pid
        for slot, process in sorted(self.replicas.items()):
            found[f"replica{slot} (pid {process.pid})"] = process.pid
        return found

    def stop(self) -> None:
        stop_processes([p for p in [self.web, *self.replicas.values()] if p is not None], grace=30)
        self.redis.stop()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Load:
    """The clients: each loops over requests until the end time or the request budget."""

    def __init__(self, base_url: str, clients: int, seconds: float, max_requests: int, max_new_tokens: int):
        self.base_url, self.clients, self.max_new_tokens = base_url, clients, max_new_tokens
        self.end = time.monotonic() + seconds
        self.budget = max_requests
        self.outcomes: Counter = Counter()
        self.sent = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _take(self) -> bool:
        with self._lock:
            if time.monotonic() >= self.end or self.sent >= self.budget:
                return False
            self.sent += 1
            return True

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        while self._take():
            stream = rng.random() < 0.5
            parameters = {"max_new_tokens": rng.randint(4, self.max_new_tokens), "details": True}
            if rng.random() < 0.3:
                parameters.update(do_sample=True, temperature=0.8, seed=rng.randint(0, 2**32))
            outcome = self._one(rng.choice(PROMPTS), parameters, stream)
            with self._lock:
                self.outcomes[outcome] += 1

    def _one(self, prompt: str, parameters: dict, stream: bool) -> str:
        return request_outcome(self.base_url, prompt, parameters, stream)


def request_outcome(base_url: str, prompt: str, parameters: dict, stream: bool) -> str:
    """'ok', 'failed: <reason>' (a clear error answer), or 'lost: <what>' (no answer)."""
    path = "/generate_stream" if stream else "/generate"
    try:
        response = requests.post(f"{base_url}{path}", json={"inputs": prompt, "parameters": parameters},
                                 stream=stream, timeout=180)
        if response.status_code != 200:
            body = response.json()
            return f"failed: {response.status_code} {body.get('error_type')}: {body.get('error')}"
        if not stream:
            return "ok" if "generated_text" in response.json() else "lost: 200 without generated_text"
        return _stream_outcome(response)
    except requests.RequestException as error:
        return f"lost: {type(error).__name__}"


def _stream_outcome(response) -> str:
    events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    if not events:
        return "lost: stream without events"
    last = events[-1]
    if "error" in last:
        return f"failed: stream error event {last.get('error_type')}: {last.get('error')}"
    indices = [e["index"] for e in events]
    if indices != list(range(1, len(events) + 1)):
        return "lost: stream with a gap or a duplicate"
    return "ok" if last.get("generated_text") is not None else "lost: stream ended without its final event"


def chaos(cluster: Cluster, seconds: float, log: list[str], started: float) -> None:
    """SIGKILL replica 1 at a third of the run, start it again at half."""
    victim = max(cluster.replicas)
    time.sleep(seconds / 3)
    cluster.kill_replica(victim)
    log.append(f"t={time.monotonic() - started:6.1f}s  SIGKILL replica{victim}")
    time.sleep(seconds / 6)
    cluster.start_replica(victim)
    log.append(f"t={time.monotonic() - started:6.1f}s  started replica{victim} again")
    cluster.wait_ready(len(cluster.replicas), 300)
    log.append(f"t={time.monotonic() - started:6.1f}s  replica{victim} active again")


def print_rss(title: str, rss: dict[str, float | None]) -> None:
    print(title)
    for name, value in rss.items():
        print(f"  {name:<28} {'gone' if value is None else f'{value:8.1f} MB'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=None, help="default: the service's default model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--burst", action="store_true",
                        help="instead of the soak: bursts of 1x, 2x and 4x --max-concurrent-requests at once "
                             "(bench/soak_burst.py)")
    parser.add_argument("--max-concurrent-requests", type=int, default=128, help="with --burst: the limit")
    parser.add_argument("--max-batch-size", type=int, default=32, help="with --burst: per replica")
    args = parser.parse_args(argv)
    if args.burst:
        from bench.soak_burst import run_bursts

        return run_bursts(args)
    if args.replicas < 2:
        parser.error("--replicas must be >= 2 (one is killed)")
    seconds = min(args.minutes, 60.0) * 60
    workdir = Path(tempfile.mkdtemp(prefix="blitzscale-soak-"))
    cluster = Cluster(args.model_id, args.replicas, args.web_workers, workdir)
    try:
        cluster.start()
        before = {name: rss_mb(pid) for name, pid in cluster.processes().items()}
        load = Load(cluster.base_url, args.clients, seconds, args.max_requests, args.max_new_tokens)
        log: list[str] = []
        started = time.monotonic()
        chaos_thread = threading.Thread(target=chaos, args=(cluster, seconds, log, started), daemon=True)
        chaos_thread.start()
        load.run()
        elapsed = time.monotonic() - started
        chaos_thread.join(300)
        after = {name: rss_mb(pid) for name, pid in cluster.processes().items()}
    finally:
        cluster.stop()
    report(args, load, log, elapsed, before, after, workdir)
    return 0 if not any(k.startswith("lost") for k in load.outcomes) else 1


def report(args, load: Load, log: list[str], elapsed: float, before: dict, after: dict, workdir: Path) -> None:
    succeeded = load.outcomes["ok"]
    failed = {k: v for k, v in load.outcomes.items() if k.startswith("failed")}
    lost = {k: v for k, v in load.outcomes.items() if k.startswith("lost")}
    print(f"soak: {args.clients} clients, {elapsed:.0f} s, {args.replicas} replicas, {args.web_workers} web workers, "
          f"model {args.model_id or 'default'}")
    print("\n".join(log))
    print(f"sent      {load.sent}")
    print(f"succeeded {succeeded}")
    print(f"failed    {sum(failed.values())}")
    for reason, count in sorted(failed.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {reason}")
    print(f"lost      {sum(lost.values())}")
    for reason, count in sorted(lost.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {reason}")
    print(f"throughput {succeeded / elapsed:.2f} requests/s")
    print_rss("RSS at start:", before)
    print_rss("RSS at end:", after)
    print(f"logs: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
