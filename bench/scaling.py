"""Live scaling, measured on the default model through the real service.

    .venv/bin/python -m bench.scaling            # the full run (a few minutes on 2 CPU cores)
    .venv/bin/python -m bench.scaling --quick    # fewer repeats and a smaller burst

1. Scale-up latency, from the POST /modify_cluster_state to the first token served by the new
   replica (the only one; a streaming request is sent until the web accepts it): standby → active
   (add_consumer); a new process with the host cache warm; a new process with no cache (GGUF
   conversion). Baseline: a bare Python process that imports torch and maps the cached weights.
2. A burst replayed three times: the autoscaler (min 1, max 3) with two standby replicas
   (`--standby-replicas 2`: scale-up is an add_consumer), the autoscaler starting new processes,
   and one fixed replica: TTFT p50/p99, requests finished, active replicas over time.
Prints tables; writes bench/results/scaling.json and scaling.png.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cluster import Cluster, FirstToken, timed_stream
from bench.common import RESULTS_DIR, percentile, print_table, save

TARGETS = {"standby_s": 0.2, "warm_over_baseline": 1.5}


def measure_up(cluster: Cluster, slot: int) -> dict:
    """Scale `slot` up (no other replica serves), then stream one request (refused until a replica
    serves, then queued); seconds from the POST to its first token."""
    posted = time.perf_counter()
    cluster.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[slot])
    post_s = time.perf_counter() - posted
    request = FirstToken(cluster.base_url)
    view = cluster.wait_state(slot, "active", poll=0.01)
    active_s = time.perf_counter() - posted  # the replica reports `active` (it consumes)
    seconds = request.wait() - posted
    return {"seconds": seconds, "post_s": post_s, "active_s": active_s, "weight_source": view.get("weight_source"),
            "load_seconds": view.get("load_seconds")}


def ttft_floor(cluster: Cluster, runs: int) -> list[float]:
    """Time to first token on a replica that is already active: what every path above includes."""
    times = []
    for _ in range(runs):
        sent = time.perf_counter()
        times.append(FirstToken(cluster.base_url).wait() - sent)
    return times


def wait_exited(pid: int, timeout: float = 60) -> None:
    """The old process is gone (it reports `stopped` before its interpreter exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def baseline_load(model_dir: Path, device: str) -> float:
    """A fresh Python process that imports torch + transformers and maps the cached weights."""
    code = ("import sys, torch; from pathlib import Path; from engine.weights import load_model; "
            f"load_model(Path({str(model_dir)!r}), torch.device({device!r}), None)")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def scale_up_latency(args, log_dir: Path) -> dict:
    from common import model_files
    from common.settings import Settings

    cache = tempfile.mkdtemp(prefix="blitzscale-bench-cache-")
    cluster = Cluster(log_dir / "scale-up.log", manually_scale=True, num_replicas=0, max_replicas=2,
                      down_target="standby", weight_cache_dir=cache, device=args.device)
    runs: dict[str, list[dict]] = {"standby → active": [], "new process, warm cache": [], "new process, no cache": []}
    try:
        cluster.wait_ready(active=0)
        model_dir = model_files.prepared_dir(Settings.from_env(weight_cache_dir=cache))
        (model_dir / "model.safetensors").unlink()  # `serve` converted it at start: no cache now
        runs["new process, no cache"].append(measure_up(cluster, 0))
        for _ in range(args.repeats):
            cluster.modify("TriggerNormalDown", stub_indices=[0])
            cluster.wait_state(0, "standby")
            runs["standby → active"].append(measure_up(cluster, 0))
        floor = ttft_floor(cluster, args.repeats)
        baselines = []
        for _ in range(max(1, args.repeats // 2)):
            view = cluster.slot(0)
            cluster.celery.control.shutdown(destination=[view["name"]])  # an operator's plain Celery command
            cluster.wait_state(0, "stopped")
            wait_exited(view["pid"])
            baselines.append(baseline_load(model_dir, args.device))  # same moment, same machine load
            runs["new process, warm cache"].append(measure_up(cluster, 0))
    finally:
        cluster.close()
    rows = []
    for path, measured in runs.items():
        seconds = [m["seconds"] for m in measured]
        rows.append({"path": path, "runs": len(seconds), "median_s": statistics.median(seconds), "min_s": min(seconds),
                     "max_s": max(seconds), "active_s": statistics.median(m["active_s"] for m in measured),
                     "post_s": statistics.median(m["post_s"] for m in measured),
                     "replica_weights": measured[-1]["weight_source"], "replica_load_s": measured[-1]["load_seconds"]})
    rows.append({"path": "already active: TTFT only", "runs": len(floor), "median_s": statistics.median(floor),
                 "min_s": min(floor), "max_s": max(floor)})
    rows.append({"path": "baseline: python + map weights", "runs": len(baselines), "median_s": statistics.median(baselines),
                 "min_s": min(baselines), "max_s": max(baselines), "replica_weights": "host-cache"})
    by_path = {r["path"]: r for r in rows}
    ratios = {"standby_s": by_path["standby → active"]["median_s"],
              "warm_over_baseline": by_path["new process, warm cache"]["median_s"] / statistics.median(baselines)}
    return {"rows": rows, "runs": runs, "baselines": baselines, "ttft_floor": floor, "ratios": ratios}


def burst_schedule(args) -> list[tuple[float, str, int]]:
    """(send offset s, prompt, new tokens): quiet, then `burst_requests` arriving over `burst_s`."""
    rng = random.Random(0)
    words = "the river city model token queue replica stream batch cache engine worker".split()
    offsets = sorted(rng.uniform(0, args.burst_s) for _ in range(args.burst_requests))
    return [(1.0 + t, " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))), args.burst_tokens)
            for t in offsets]


def run_burst(args, mode: str, log_dir: Path) -> dict:
    autoscaled = {"min_replicas": 1, "max_replicas": 3, "scale_down_hold": args.hold, "scale_interval": 0.25}
    scaling = {"autoscaler": {**autoscaled, "standby_replicas": 2},  # warm pool: up = add_consumer
               "autoscaler-cold": autoscaled,  # up = a new process (host cache warm)
               "fixed": {"manually_scale": True}}[mode]
    # A replica is bound to one device: on CPU, one core (its torch threads), as one GPU per replica.
    env = {"OMP_NUM_THREADS": str(args.threads_per_replica)} if args.device == "cpu" else {}
    cluster = Cluster(log_dir / f"burst-{mode}.log", env=env, num_replicas=1, max_batch_size=args.batch,
                      device=args.device, **scaling)
    results, timeline, lock = [], [], threading.Lock()
    try:
        cluster.wait_ready(active=1)
        if mode == "autoscaler":
            cluster.wait_for_standby(2)
        FirstToken(cluster.base_url).wait()  # warm-up
        done = threading.Event()

        def sample():
            while not done.is_set():
                counts = cluster.state()["counts"]
                timeline.append({"t": time.perf_counter() - started, **counts})
                done.wait(0.25)

        started = time.perf_counter()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = []
        for offset, prompt, tokens in burst_schedule(args):
            time.sleep(max(0.0, started + offset - time.perf_counter()))
            client = threading.Thread(target=timed_stream, args=(cluster.base_url, prompt, tokens, time.perf_counter(),
                                                                 results, lock))
            client.start()
            clients.append(client)
        for client in clients:
            client.join()
        finished_at = time.perf_counter() - started
        if mode.startswith("autoscaler"):  # watch it scale back down after the hold time
            time.sleep(args.hold + 3)
        done.set()
        sampler.join()
    finally:
        cluster.close()
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"mode": mode, "requests": len(results), "finished": sum(r["ok"] for r in results),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99), "seconds": finished_at,
            "max_active": max((p["active"] for p in timeline), default=0), "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="standby → active runs (half as many new processes)")
    parser.add_argument("--burst-requests", type=int, default=32)
    parser.add_argument("--burst-s", type=float, default=4.0, help="the burst arrives over this many seconds")
    parser.add_argument("--burst-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="--max-batch-size of each replica")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="CPU only: each replica's torch threads")
    parser.add_argument("--hold", type=float, default=8.0, help="--scale-down-hold of the autoscaler")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.burst_requests, args.burst_tokens = 2, 16, 16
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    log_dir = RESULTS_DIR / "scaling-logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    up = scale_up_latency(args, log_dir)
    print(f"scale-up latency on {args.device} (POST /modify_cluster_state → first token of the new replica)")
    print_table(up["rows"], ["path", "runs", "median_s", "min_s", "max_s", "active_s", "post_s", "replica_weights",
                             "replica_load_s"])
    print("median_s: POST → first token; active_s: POST → the replica reports active; post_s: the POST itself")
    verdicts = {"standby_s": up["ratios"]["standby_s"] < TARGETS["standby_s"],
                "warm_over_baseline": up["ratios"]["warm_over_baseline"] <= TARGETS["warm_over_baseline"]}
    for name, value in up["ratios"].items():
        print(f"{name:20s} {value:6.3f}  (target {'<' if name == 'standby_s' else '<='} {TARGETS[name]}: "
              f"{'meets' if verdicts[name] else 'MISSES'})")

    bursts = [run_burst(args, mode, log_dir) for mode in ("autoscaler", "autoscaler-cold", "fixed")]
    print(f"\nburst: {args.burst_requests} streams x {args.burst_tokens} tokens over {args.burst_s:.0f} s, "
          f"--max-batch-size {args.batch}" + (f", {args.threads_per_replica} thread(s) per replica" if args.device == "cpu" else ""))
    print_table(bursts, ["mode", "requests", "finished", "ttft_p50_s", "ttft_p99_s", "seconds", "max_active"])
    results = {"device": args.device, "cpu_count": os.cpu_count(), "args": vars(args), "scale_up": up,
               "targets": TARGETS, "verdicts": verdicts, "bursts": bursts}
    path = save("scaling", results)
    plot(up["rows"], bursts, path.with_suffix(".png"))
    print(f"results: {path} and {path.with_suffix('.png')}")


def plot(up_rows: list[dict], bursts: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bash scripts/install.sh --bench): no plot")
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    labels = [r["path"].replace(", ", "\n").replace(": ", "\n").replace(" + ", "\n+ ") for r in up_rows]
    left.bar(labels, [r["median_s"] for r in up_rows], color="tab:blue")
    left.set_yscale("log")
    left.set_ylabel("seconds (median)")
    left.set_title("Scale-up: POST → first token")
    left.tick_params(axis="x", labelsize=7)
    modes = [b["mode"] for b in bursts]
    for offset, key in [(-0.2, "ttft_p50_s"), (0.2, "ttft_p99_s")]:
        middle.bar([i + offset for i in range(len(modes))], [b[key] for b in bursts], width=0.4, label=key)
    middle.set_xticks(range(len(modes)), modes)
    middle.set_ylabel("seconds")
    middle.set_title("Burst: time to first token")
    middle.legend()
    for burst in bursts:
        points = burst["timeline"]
        right.step([p["t"] for p in points], [p["active"] for p in points], where="post", label=f"{burst['mode']} active")
        if burst["mode"].startswith("autoscaler"):
            right.step([p["t"] for p in points], [p["active"] + p["loading"] for p in points], where="post",
                       linestyle=":", label=f"{burst['mode']} active+loading")
    right.set_xlabel("seconds since the burst began")
    right.set_ylabel("replicas")
    right.set_title("Replicas over time")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
