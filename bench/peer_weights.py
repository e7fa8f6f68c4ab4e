"""Weights from a live peer (BlitzScale's network scale-up), measured on this machine.

    .venv/bin/python -m bench.peer_weights            # the default model (SmolLM2-135M GGUF), ~3 min
    .venv/bin/python -m bench.peer_weights --model-id DIR --weight-peers prefer   # another model

Two simulated hosts share the machine: host A (replica 0, its own host cache, data plane on
127.0.0.1) and host B (a host agent with an empty host cache, data plane on 127.0.0.2).

1. POST /modify_cluster_state → first token of the new replica on host B (it alone serves; the
   source is in standby), when its weights come from the peer, from B's host cache, and from
   local preparation (no peer alive: GGUF conversion).
2. The data plane's rate (parallel verified ranges from replica 0, into a directory) against a
   plain socket copy of the same bytes (sendfile → recv_into → file) on this machine.
3. Three new receivers at once (separate processes and directories): a chain (each pulls from its
   predecessor, which forwards the chunks as they arrive) vs all pulling from the source: bytes
   the source sent and the total time.
Prints tables; writes bench/results/peer_weights.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests
from celery import Celery

from bench.cluster import FirstToken
from bench.common import print_table, save
from blitzscale.redis_server import EmbeddedRedis, free_port
from blitzscale.supervisor import stop_processes
from common import model_files
from common.settings import Settings, default_model_id
from tasks.weights.fetch import ChunkFetcher, Source, fetch_manifest
from tasks.weights.manifest import served_files
from tasks.weights.server import WeightServer
from tasks.weights.secret import weights_secret

HOST_A, HOST_B = "127.0.0.1", "127.0.0.2"


class TwoHosts:
    """Redis, the web, replica 0 on host A, and host B's agent (which starts what we scale up)."""

    def __init__(self, args, workdir: Path):
        self.workdir = workdir
        self.redis = EmbeddedRedis().start()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cache_a, self.cache_b = workdir / "host-a", workdir / "host-b"
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "MODEL_ID": args.model_id, "PORT": str(self.port),
                    "MANUALLY_SCALE": "true", "MAX_REPLICAS": "2", "HF_HUB_OFFLINE": "1",
                    "WEIGHT_PEERS": args.weight_peers, "XDG_CACHE_HOME": str(workdir / "home")}
        self.processes: dict[str, subprocess.Popen] = {}
        self.spawn("replica0", ["worker", "--slot", "0"], WEIGHT_CACHE_DIR=str(self.cache_a), WEIGHTS_HOST=HOST_A)
        self.spawn("web", ["web"], WEIGHT_CACHE_DIR=str(self.cache_a))
        self.spawn("agent", ["agent"], WEIGHT_CACHE_DIR=str(self.cache_b), WEIGHTS_HOST=HOST_B)
        self.connection = redis.Redis.from_url(self.redis.url)

    def spawn(self, name: str, args: list[str], **env) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", *args],
                                                env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)

    def slot(self, slot: int) -> dict:
        try:
            state = requests.get(f"{self.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
        except (requests.ConnectionError, ValueError):
            return {"state": None}
        return next((r for r in state["replicas"] if r["slot"] == slot), {"state": None})

    def wait_state(self, slot: int, state: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (view := self.slot(slot))["state"] == state:
                return view
            time.sleep(0.05)
        raise TimeoutError(f"slot {slot} did not reach {state}; see {self.workdir}")

    def modify(self, kind: str, **data) -> None:
        response = requests.post(f"{self.base_url}/modify_cluster_state", json={"type": kind, "data": data}, timeout=30)
        response.raise_for_status()

    def stop_slot(self, slot: int) -> None:
        """Celery's shutdown to the slot's replica, then wait for its process to exit."""
        view = self.slot(slot)
        Celery("bench", broker=self.redis.url).control.shutdown(destination=[view["name"]])
        self.wait_state(slot, "stopped")
        ours = next((p for p in self.processes.values() if p.pid == view["pid"]), None)
        if ours is not None:
            ours.wait(60)  # our child (a zombie until waited for)
        while _alive(view["pid"]):
            time.sleep(0.05)

    def close(self) -> None:
        stop_processes(list(self.processes.values()), grace=30)
        self.redis.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def measure_up(hosts: TwoHosts, slot: int, sources: list[int]) -> dict:
    """POST → first token of `slot` (no other replica consumes meanwhile)."""
    posted = time.perf_counter()
    hosts.modify("TriggerNormalUp", old_stub_indices=sources, new_stub_indices=[slot])
    post_s = time.perf_counter() - posted
    request = FirstToken(hosts.base_url)
    view = hosts.wait_state(slot, "active")
    return {"seconds": request.wait() - posted, "post_s": post_s, "weight_source": view["weight_source"],
            "load_s": view["load_seconds"], "weight_s": view["weight_seconds"], "transfer": view.get("transfer")}


def scale_up_paths(hosts: TwoHosts) -> list[dict]:
    hosts.wait_state(0, "active")
    hosts.modify("TriggerNormalDown", stub_indices=[0])  # the source serves weights, not requests
    hosts.wait_state(0, "standby")
    rows = [{"path": "from a peer", **measure_up(hosts, 1, [0])}]
    hosts.stop_slot(1)
    rows.append({"path": "from the host cache", **measure_up(hosts, 1, [0])})
    return rows


def local_preparation(hosts: TwoHosts) -> dict:
    hosts.stop_slot(1)
    hosts.stop_slot(0)  # no peer alive
    shutil.rmtree(hosts.cache_b / "models")
    return {"path": "local preparation", **measure_up(hosts, 1, [])}


# -- the data plane alone


def socket_copy(files: list[Path], into: Path) -> float:
    """A plain TCP copy of the same bytes: sendfile in a child process, recv_into + write here."""
    listener = socket.create_server((HOST_A, 0))
    port = listener.getsockname()[1]
    sender = ("import socket, sys, os\ns = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
              "for name in sys.argv[3:]:\n    f = open(name, 'rb'); s.sendfile(f); f.close()\ns.close()")
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", sender, HOST_A, str(port), *map(str, files)])
    connection, _ = listener.accept()
    buffer = memoryview(bytearray(4 << 20))
    total = 0
    with open(into, "wb", buffering=0) as out:
        while read := connection.recv_into(buffer):
            out.write(buffer[:read])
            total += read
    seconds = time.perf_counter() - started
    child.wait()
    connection.close()
    listener.close()
    return total / seconds


def peer_copy(source: Source, sha: str, secret: str, into: Path, parallel: int) -> float:
    started = time.perf_counter()
    manifest = fetch_manifest(source, sha, secret)
    ChunkFetcher(manifest, into, secret, parallel).run(lambda failed: None if source.name in failed else source)
    return manifest.total / (time.perf_counter() - started)


def rates(hosts: TwoHosts, settings: Settings, repeats: int, parallel: int) -> dict:
    view = hosts.slot(0)
    sha = view["weights"]["sha"]
    files = served_files(model_files.prepared_dir(settings.replace(weight_cache_dir=str(hosts.cache_a))))
    secret = weights_secret(settings, hosts.connection)
    source = Source(view["name"], view["weights"]["addr"])
    plain, peer = [], []
    for i in range(repeats):  # alternating which goes first: the machine's load and writeback hit both alike
        scratch = Path(tempfile.mkdtemp(dir=hosts.workdir))
        for kind in (("plain", "peer") if i % 2 == 0 else ("peer", "plain")):
            if kind == "plain":
                plain.append(socket_copy(files, scratch / "plain"))
            else:
                peer.append(peer_copy(source, sha, secret, scratch / "peer", parallel))
        shutil.rmtree(scratch)
    return {"bytes": sum(f.stat().st_size for f in files), "plain_MBps": [round(r / 1e6) for r in plain],
            "peer_MBps": [round(r / 1e6) for r in peer], "ratio_best": round(max(peer) / max(plain), 3),
            "ratio_median": round(statistics.median(peer) / statistics.median(plain), 3)}


def receive_main(argv: list[str]) -> None:
    """A receiver process: pull from argv[0] (its predecessor or the source), serve what it has,
    print its address, then `done <seconds>`; exit when stdin closes."""
    url, sha, secret, into, parallel = argv[0], argv[1], argv[2], Path(argv[3]), int(argv[4])
    source = Source(url, url)
    manifest = fetch_manifest(source, sha, secret)
    fetcher = ChunkFetcher(manifest, into, secret, parallel)
    fetcher.create_files()
    server = WeightServer(HOST_B, 0, secret).start()
    holding = server.hold(manifest, into, complete=False)
    fetcher.on_chunk = lambda index, *_: holding.mark(index)
    print(server.address, flush=True)
    started = time.perf_counter()
    fetcher.run(lambda failed: None if url in failed else source)
    print(f"done {time.perf_counter() - started:.3f}", flush=True)
    sys.stdin.read()
    server.stop()


def three_receivers(hosts: TwoHosts, settings: Settings, chain: bool, parallel: int) -> dict:
    view = hosts.slot(0)
    sha, secret = view["weights"]["sha"], weights_secret(settings, hosts.connection)
    time.sleep(1.5)  # the source's record (bytes sent) is refreshed every heartbeat
    before = hosts.slot(0)["weights"]["sent_bytes"]
    scratch = Path(tempfile.mkdtemp(dir=hosts.workdir))
    children, upstream = [], view["weights"]["addr"]
    started = time.perf_counter()
    for i in range(3):
        child = subprocess.Popen([sys.executable, "-m", "bench.peer_weights", "--receive", upstream, sha, secret,
                                  str(scratch / f"r{i}"), str(parallel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        address = child.stdout.readline().strip()
        children.append(child)
        upstream = address if chain else upstream
    done = [child.stdout.readline() for child in children]
    seconds = time.perf_counter() - started
    for child in children:
        child.stdin.close()
        child.wait(30)
    time.sleep(1.5)  # the source's record is refreshed every heartbeat
    sent = hosts.slot(0)["weights"]["sent_bytes"] - before
    shutil.rmtree(scratch)
    assert all(line.startswith("done") for line in done), done
    return {"mode": "chain" if chain else "all from the source", "source_sent_MB": round(sent / 1e6, 1),
            "total_s": round(seconds, 2)}


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=default_model_id())
    parser.add_argument("--weight-peers", default="auto", help="auto for a GGUF model, prefer for a directory")
    parser.add_argument("--repeats", type=int, default=4, help="data-plane rate runs")
    parser.add_argument("--parallel", type=int, default=4, help="ranges in flight per copy")
    parser.add_argument("--receive", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        return receive_main(args.receive)
    signal.signal(signal.SIGTERM, _interrupt)  # `finally` stops every process we started
    workdir = Path(tempfile.mkdtemp(prefix="blitzscale-bench-peer-"))
    settings = Settings.from_env(model_id=args.model_id)
    hosts = TwoHosts(args, workdir)
    try:
        paths = scale_up_paths(hosts)
        rate = rates(hosts, settings, args.repeats, args.parallel)
        fanout = [three_receivers(hosts, settings, chain, args.parallel) for chain in (True, False)]
        paths.append(local_preparation(hosts))
    finally:
        hosts.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmodel {args.model_id}\n\n1. POST /modify_cluster_state → first token of the new replica (host B)")
    print_table(paths, ["path", "seconds", "post_s", "weight_source", "weight_s", "load_s"])
    peer = paths[0]["transfer"] or {}
    print(f"   the peer copy: {peer.get('total', 0) / 1e6:.0f} MB in {peer.get('seconds')} s "
          f"({peer.get('mbps')} MB/s) from {peer.get('sources')}")
    print(f"\n2. data plane vs a plain socket copy of the same {rate['bytes'] / 1e6:.0f} MB ({args.repeats} runs each, MB/s)")
    print(f"   plain socket {rate['plain_MBps']}   peer weights {rate['peer_MBps']}")
    print(f"   ratio of the best runs {rate['ratio_best']}, of the medians {rate['ratio_median']} (target >= 0.7)")
    print("\n3. three new receivers at once")
    print_table(fanout, ["mode", "source_sent_MB", "total_s"])
    save("peer_weights", {"paths": paths, "rate": rate, "fanout": fanout, "model_id": args.model_id})


if __name__ == "__main__":
    main()
