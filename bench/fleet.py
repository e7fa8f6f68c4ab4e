"""A fleet scale-up, measured on simulated hosts on this machine.

    .venv/bin/python -m bench.fleet                       # the default model, 1, 2 and 4 new replicas
    .venv/bin/python -m bench.fleet --counts 1,2 --model-id DIR --weight-peers prefer

Replica 0 runs on host h0 (its own host cache, data plane on 127.0.0.1) and holds the model. Then,
for 1, 2 and 4 new replicas in one `TriggerNormalUp` (old stub 0), every new host's cache emptied
first:

- two hosts: agents h1 and h2 (`--devices cpu,cpu` each, caches of their own, data planes on
  127.0.0.2 and 127.0.0.3): placement spreads the replicas and chains the copies (h1 from the
  source, h2 from h1); a second replica on a host maps what the first copied;
- one host: agent h1 alone with four CPU places: one copy, every other replica maps it.

After one unmeasured warm-up, each count runs on both layouts in turn. Prints, side by side:
command → every new replica active, the bytes the source sent, the bytes copied in all, and where
placement put each replica. Writes bench/results/fleet.json. Every process shares this machine's
cores, so the times say what placement and the chain cost here, not what separate hosts would gain.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
import requests

from bench.common import print_table, save
from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_processes
from common.settings import Settings, default_model_id
from tasks.weights.sources import read_transfers

SOURCE = "replica0@h0"
LAYOUTS = {"two hosts": {"h1": ("cpu,cpu", "127.0.0.2"), "h2": ("cpu,cpu", "127.0.0.3")},
           "one host": {"h1": ("cpu,cpu,cpu,cpu", "127.0.0.2")}}


class Fleet:
    """Redis, the web, replica 0 on h0; agents come and go with the layout."""

    def __init__(self, args, workdir: Path):
        self.workdir = workdir
        self.redis = EmbeddedRedis().start()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "MODEL_ID": args.model_id, "PORT": str(self.port),
                    "MANUALLY_SCALE": "true", "MAX_REPLICAS": "5", "DOWN_TARGET": "stop", "HF_HUB_OFFLINE": "1",
                    "WEIGHT_PEERS": args.weight_peers, "HEARTBEAT_TTL": "3"}
        self.processes: dict[str, subprocess.Popen] = {}
        source_cache = Settings.from_env(self.env).weight_cache_dir  # the default model converted once, here
        self.spawn("replica0", ["worker", "--slot", "0"], HOST_NAME="h0", WEIGHTS_HOST="127.0.0.1",
                   WEIGHT_CACHE_DIR=source_cache)
        self.spawn("web", ["web"], WEIGHT_CACHE_DIR=source_cache)
        self.connection = redis.Redis.from_url(self.redis.url)

    def spawn(self, name: str, args: list[str], **env) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", *args],
                                                env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_agents(self, layout: dict[str, tuple[str, str]]) -> None:
        for host, (devices, address) in layout.items():
            self.spawn(f"agent-{host}", ["agent", "--host-name", host, "--devices", devices],
                       WEIGHT_CACHE_DIR=str(self.cache(host)), WEIGHTS_HOST=address)
        self.wait(lambda: sorted(self.state()["agents"]) == sorted(layout), "the agents")

    def stop_agents(self) -> None:
        agents = [name for name in self.processes if name.startswith("agent-")]
        stop_processes([self.processes.pop(name) for name in agents], grace=60)
        self.wait(lambda: not self.state()["agents"], "the agents gone")

    def cache(self, host: str) -> Path:
        return self.workdir / f"cache-{host}"

    def state(self) -> dict:
        try:
            return requests.get(f"{self.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
        except (requests.ConnectionError, ValueError):
            return {"agents": [], "replicas": [], "hosts": []}

    def states(self, slots: list[int]) -> dict[int, str]:
        return {r["slot"]: r["state"] for r in self.state()["replicas"] if r["slot"] in slots}

    def modify(self, kind: str, **data) -> None:
        response = requests.post(f"{self.base_url}/modify_cluster_state", json={"type": kind, "data": data}, timeout=30)
        response.raise_for_status()

    def wait(self, predicate, what: str, timeout: float = 600, poll: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := predicate():
                return value
            time.sleep(poll)
        raise TimeoutError(f"{what} not reached in {timeout} s; see {self.workdir}")

    def close(self) -> None:
        stop_processes(list(self.processes.values()), grace=60)
        self.redis.stop()


def scale_up(fleet: Fleet, layout: dict, count: int) -> dict:
    """Empty the new hosts' caches, scale up `count` replicas, time them to active, stop them."""
    for host in layout:
        shutil.rmtree(fleet.cache(host), ignore_errors=True)
    fleet.wait(lambda: all(not h["models"] for h in fleet.state()["hosts"]), "the caches empty")
    slots = list(range(1, count + 1))
    before = read_transfers(fleet.connection)
    posted = time.perf_counter()
    fleet.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=slots)
    fleet.wait(lambda: set(fleet.states(slots).values()) == {"active"}, f"{count} replicas active", poll=0.02)
    seconds = time.perf_counter() - posted
    sent = {k.removeprefix("bytes:"): int(v) - int(before.get(k, 0))
            for k, v in read_transfers(fleet.connection).items() if k.startswith("bytes:")}
    placed = fleet.state()["placement"]["placements"]
    fleet.modify("TriggerNormalDown", stub_indices=slots)
    fleet.wait(lambda: set(fleet.states(slots).values()) == {"stopped"}, "the new replicas stopped")
    fleet.wait(lambda: all(p["slot"] is None for h in fleet.state()["hosts"] for p in h["places"]), "places free")
    hosts = Counter(p["host"] for p in placed)
    return {"layout": None, "new_replicas": count, "active_s": round(seconds, 2),
            "source_mb": round(sent.get(SOURCE, 0) / 1e6, 1), "copied_mb": round(sum(sent.values()) / 1e6, 1),
            "placed": " ".join(f"{h}:{n}" for h, n in sorted(hosts.items())),
            "chain": " ".join(f"{p['slot']}<{','.join(map(str, p['fetch_from'])) or '-'}" for p in placed)}


def warm_up(fleet: Fleet) -> None:
    """One scale-up that is not measured: the first replica start of a run pays for cold caches
    (the interpreter's files, torch's libraries), which no layout should be charged with."""
    layout = LAYOUTS["one host"]
    fleet.start_agents(layout)
    scale_up(fleet, layout, 1)
    fleet.stop_agents()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=os.environ.get("MODEL_ID") or default_model_id())
    parser.add_argument("--weight-peers", default="auto", help="prefer for a model directory")
    parser.add_argument("--counts", default="1,2,4")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    fleet = Fleet(args, workdir)
    rows = []
    try:
        fleet.wait(lambda: "active" in fleet.states([0]).values(), "replica 0 active")
        warm_up(fleet)
        for count in counts:  # the layouts side by side at each count
            for name, layout in LAYOUTS.items():
                fleet.start_agents(layout)
                rows.append({**scale_up(fleet, layout, count), "layout": name})
                print_table(rows[-1:], list(rows[-1]))
                fleet.stop_agents()
    finally:
        fleet.close()
    print()
    print_table(rows, ["layout", "new_replicas", "active_s", "source_mb", "copied_mb", "placed", "chain"])
    for count in counts:
        two, one = (next(r for r in rows if r["layout"] == name and r["new_replicas"] == count) for name in LAYOUTS)
        print(f"{count} new: two hosts / one host, time to all active {two['active_s'] / one['active_s']:.2f}x; "
              f"source sent {two['source_mb']} MB vs {one['source_mb']} MB")
    path = save("fleet", {"model_id": args.model_id, "rows": rows})
    print(f"wrote {path}; logs in {workdir}")


if __name__ == "__main__":
    main()
