"""A cold start's weights from another host's cache, from this host's cache, and from the source,
measured side by side on this machine (docs/host-cache.md).

    .venv/bin/python -m bench.host_cache                 # the default model (SmolLM2-135M GGUF), ~4 min
    .venv/bin/python -m bench.host_cache --rounds 1 --model-id DIR --weight-peers prefer

Two simulated hosts: host B is an agent whose cache holds the prepared model (it starts no
replica; its data plane on 127.0.0.2) and host A is where one replica starts cold, no replica of
the model running anywhere. Per round, in turn:

- remote: A's cache empty, B's agent serving: the weights come over B's data plane;
- local: A's cache holds the model (the copy the remote start left): mapped;
- source: no agent, A's cache empty: prepared from the source (for the GGUF default, a conversion).

Each prints process start → replica active, and the seconds its weights took (`weight_seconds`).
Writes bench/results/host_cache.json. The issue's target: remote ≤ 1.5× local.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import print_table, save
from blitzscale.redis_server import EmbeddedRedis
from common import model_files
from common.fleet import read_agents
from common.keys import replica_key
from common.processes import stop_processes
from common.settings import Settings, default_model_id
from tasks.weights.host_cache import keep_copy

MODES = ("remote", "local", "source")


class TwoHosts:
    def __init__(self, args, workdir: Path):
        self.workdir = workdir
        self.redis = EmbeddedRedis().start()
        self.connection = redis.Redis.from_url(self.redis.url)
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "MODEL_ID": args.model_id, "HF_HUB_OFFLINE": "1",
                    "WEIGHT_PEERS": args.weight_peers, "HEARTBEAT_TTL": "2", "LOG_LEVEL": "INFO"}
        self.settings = Settings.from_env(self.env)
        self.source = model_files.resolve(self.settings)
        self.agent: subprocess.Popen | None = None

    def cache(self, host: str) -> Path:
        return self.workdir / f"cache-{host}"

    def entry(self, host: str) -> Path:
        return model_files.cache_entry(self.settings.replace(weight_cache_dir=str(self.cache(host))), self.source.sha)

    def fill_b(self) -> None:
        """B's cache holds the prepared model (for a GGUF model: converted once, into the default cache)."""
        prepared = model_files.prepared_dir(self.settings, self.source)
        if self.source.is_gguf and not model_files.entry_complete(prepared):
            from bench.common import default_model_dir  # noqa: PLC0415 (torch: only to convert once)
            prepared = default_model_dir()
        keep_copy(prepared, self.entry("b"), self.source.sha, self.settings.weights_chunk_size,
                  self.settings.weights_checksum)

    def spawn(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "blitzscale.cli", *args], env={**self.env, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_agent_b(self) -> None:
        self.agent = self.spawn("agent-b", ["agent", "--host-name", "b", "--devices", "cpu"],
                                HOST_NAME="b", WEIGHTS_HOST="127.0.0.2", WEIGHT_CACHE_DIR=str(self.cache("b")))
        self.wait(lambda: any(a.serves_model(self.source.sha) for a in read_agents(self.connection)), "B serving")

    def stop_agent_b(self) -> None:
        if self.agent is not None:
            stop_processes([self.agent], grace=20)
            self.agent = None
        self.wait(lambda: not read_agents(self.connection), "B's agent gone")

    def cold_start(self, mode: str, round_: int) -> dict:
        started = time.perf_counter()
        process = self.spawn(f"replica-{mode}-{round_}", ["worker", "--slot", "0"], HOST_NAME="a",
                             WEIGHTS_HOST="127.0.0.1", WEIGHT_CACHE_DIR=str(self.cache("a")))
        try:
            record = self.wait(lambda: self._active(process.pid), f"the {mode} replica active", timeout=900)
            seconds = time.perf_counter() - started
        finally:
            stop_processes([process], grace=30)
        self.wait(lambda: self.connection.get(replica_key(record["name"])) is None, "the record expired")
        return {"mode": mode, "round": round_, "start_to_active_s": round(seconds, 2),
                "weight_seconds": record.get("weight_seconds"), "origin": record.get("weight_origin"),
                "from_host": record.get("weight_host"), "weight_source": record.get("weight_source")}

    def _active(self, pid: int) -> dict | None:
        raw = self.connection.get(replica_key("replica0@a"))
        record = json.loads(raw) if raw else None
        return record if record and record.get("pid") == pid and record.get("state") == "active" else None

    @staticmethod
    def wait(predicate, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := predicate():
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached in {timeout} s")

    def close(self) -> None:
        self.stop_agent_b()
        self.redis.stop()


def run_round(hosts: TwoHosts, round_: int) -> list[dict]:
    rows = []
    shutil.rmtree(hosts.cache("a"), ignore_errors=True)
    hosts.start_agent_b()
    rows.append(hosts.cold_start("remote", round_))
    hosts.stop_agent_b()
    rows.append(hosts.cold_start("local", round_))  # A's cache holds the remote start's copy
    shutil.rmtree(hosts.cache("a"), ignore_errors=True)
    rows.append(hosts.cold_start("source", round_))
    return rows


def summary(rows: list[dict]) -> dict:
    """Medians per mode, and remote / local."""
    median = {mode: {key: statistics.median(r[key] for r in rows if r["mode"] == mode)
                     for key in ("start_to_active_s", "weight_seconds")} for mode in MODES}
    return {"median": median,
            "remote_over_local": round(median["remote"]["start_to_active_s"] / median["local"]["start_to_active_s"], 2),
            "source_over_local": round(median["source"]["start_to_active_s"] / median["local"]["start_to_active_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=os.environ.get("MODEL_ID") or default_model_id())
    parser.add_argument("--weight-peers", default="auto", help="prefer for a model directory")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-host-cache-"))
    hosts = TwoHosts(args, workdir)
    rows = []
    try:
        hosts.fill_b()
        for round_ in range(args.rounds):
            rows += run_round(hosts, round_)
            print_table(rows[-3:], list(rows[-1]))
    finally:
        hosts.close()
    print()
    print_table(rows, ["mode", "round", "start_to_active_s", "weight_seconds", "origin", "from_host", "weight_source"])
    result = summary(rows)
    print(f"medians: {result['median']}")
    print(f"cold start, remote host cache / local host cache: {result['remote_over_local']}x (target <= 1.5x); "
          f"source / local: {result['source_over_local']}x")
    path = save("host_cache", {"model_id": args.model_id, "rows": rows, **result})
    print(f"wrote {path}; logs in {workdir}")


if __name__ == "__main__":
    main()
