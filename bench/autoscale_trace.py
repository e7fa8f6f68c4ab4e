"""A seeded bursty trace replayed on the testbed against three ways of choosing the replica count:
fixed at the peak, the queue-length policy, and the SLO policy (docs/scaling.md).

    python -m bench.autoscale_trace                   # 4 hosts at 1 Gbit/s, a 240 s trace, ~17 min
    python -m bench.autoscale_trace --seconds 60 --policies slo   # a short try

Needs root (bench.testbed). Arrivals are BurstGPT-like: gamma inter-arrival times (shape 0.5, so
bursty at the base rate) at `--base-rps`, and bursts of 5–10× that rate for `--burst-seconds`
every `--burst-every` seconds. Every request: a `--prompt-tokens` prompt, `--new-tokens` tokens,
streamed. The replicas run bench/trace_worker.py: a forward takes SIM_STEP_S plus
SIM_PREFILL_S_PER_TOKEN per prompt token (slept), so each replica adds the capacity of a GPU of
that speed instead of sharing this machine's two cores; a new replica still starts for real (a
process, its weights from a peer over the shaped link). Reported per policy: TTFT p50/p99, ITL
p99, SLO attainment (the share of 10 s windows, by arrival, whose TTFT p99 is within
`--ttft-slo`), replica-seconds (active + loading, over the trace). Writes
bench/results/autoscale_trace.json and .png (arrival rate, replicas and TTFT over time).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import percentile, save
from bench.testbed.fleet import Testbed
from bench.testbed.netns import NetnsUnavailable, check_permitted

WINDOW_S = 10.0


def arrivals(seed: int, seconds: float, base_rps: float, burst_every: float, burst_seconds: float) -> list[float]:
    """Arrival times: gamma(0.5) gaps at the base rate; inside a burst window, at 5–10× it."""
    rng = random.Random(seed)
    bursts = []
    start = burst_every / 2
    while start < seconds:
        bursts.append((start, start + burst_seconds, rng.uniform(5, 10)))
        start += burst_every
    times, now = [], 0.0
    while True:
        factor = next((f for a, b, f in bursts if a <= now < b), 1.0)
        now += rng.gammavariate(0.5, 1 / (0.5 * base_rps * factor))
        if now >= seconds:
            return times
        times.append(now)


class Replay:
    """Sends the trace, streaming each request in a thread; samples the replica count."""

    def __init__(self, testbed: Testbed, times: list[float], prompt_tokens: int, new_tokens: int, seed: int):
        self.testbed, self.times, self.new_tokens = testbed, times, new_tokens
        rng = random.Random(seed)  # a prompt of its own per request: no prefix-cache hits
        self.prompts = [" ".join(f"w{rng.randrange(5, 1000)}" for _ in range(prompt_tokens)) for _ in times]
        self.results: list[dict] = []
        self.replicas: list[tuple[float, int, int]] = []  # (t, active, loading)
        self._lock = threading.Lock()

    def one(self, index: int, at: float, started: float) -> None:
        body = {"inputs": self.prompts[index], "parameters": {"max_new_tokens": self.new_tokens}}
        sent = time.perf_counter()
        stamps, error = [], None
        try:
            with requests.post(f"{self.testbed.base_url}/generate_stream", json=body, stream=True, timeout=600) as r:
                if r.status_code != 200:
                    error = f"{r.status_code} {r.text[:200]}"
                for line in r.iter_lines():
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            error = event["error"]
                        elif event.get("token"):
                            stamps.append(time.perf_counter())
        except requests.RequestException as failure:
            error = str(failure)
        with self._lock:
            self.results.append({"at": at, "ttft": stamps[0] - sent if stamps else None,
                                 "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
                                 "error": error, "done": time.perf_counter() - started})

    def run(self, drain_s: float = 300) -> float:
        started = time.perf_counter()
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(started, stop), daemon=True)
        sampler.start()
        threads = []
        for index, at in enumerate(self.times):
            time.sleep(max(0.0, started + at - time.perf_counter()))
            thread = threading.Thread(target=self.one, args=(index, at, started), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = time.perf_counter() + drain_s
        for thread in threads:
            thread.join(max(0.1, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
        return elapsed

    def _sample(self, started: float, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            states = [r["state"] for r in self.testbed.cluster()["replicas"]]
            self.replicas.append((time.perf_counter() - started, states.count("active"), states.count("loading")))


def summarise(policy: str, replay: Replay, elapsed: float, slo: float) -> dict:
    ok = [r for r in replay.results if r["ttft"] is not None and not r["error"]]
    ttfts = [r["ttft"] for r in ok]
    itls = [gap for r in ok for gap in r["itl"]]
    windows = {}
    for r in replay.results:
        windows.setdefault(int(r["at"] // WINDOW_S), []).append(r["ttft"] if r["ttft"] is not None and not r["error"] else float("inf"))
    within = [percentile(v, 99) <= slo for v in windows.values()]
    samples = replay.replicas
    replica_s = sum((b[0] - a[0]) * (a[1] + a[2]) for a, b in zip(samples, samples[1:]))
    return {"policy": policy, "requests": len(replay.results), "failed": len(replay.results) - len(ok),
            "ttft_p50": round(percentile(ttfts, 50), 3) if ttfts else None,
            "ttft_p99": round(percentile(ttfts, 99), 3) if ttfts else None,
            "itl_p99": round(percentile(itls, 99), 4) if itls else None,
            "slo_windows": f"{sum(within)}/{len(within)}", "slo_attainment": round(sum(within) / max(1, len(within)), 3),
            "replica_seconds": round(replica_s, 1), "elapsed_s": round(elapsed, 1),
            "max_replicas": max((a + b for _, a, b in samples), default=0)}


def run_policy(policy: str, args, model: str, times: list[float]) -> tuple[dict, Replay]:
    hosts = args.hosts
    env = {"MAX_BATCH_SIZE": str(args.batch), "MAX_INPUT_TOKENS": "1024", "MAX_TOTAL_TOKENS": "1536",
           "SIM_STEP_S": str(args.step_ms / 1000), "SIM_PREFILL_S_PER_TOKEN": str(args.prefill_ms_per_token / 1000),
           "MAX_REPLICAS": str(hosts), "MIN_REPLICAS": "1", "OMP_NUM_THREADS": "1",
           "PREBOOT": "1"}  # every policy: scale-ups in pre-booted processes (docs/scaling.md)
    fixed = policy == "fixed"
    testbed = Testbed(hosts, args.rate, model, replicas={f"h{i}": 1 for i in range(hosts if fixed else 1)},
                      env=env, agent_module="bench.trace_worker")
    try:
        testbed.up(timeout=300)
        if not fixed:
            testbed.spawn("autoscaler", ["autoscaler"], MANUALLY_SCALE="false", AUTOSCALE_POLICY=policy,
                          TTFT_SLO=str(args.ttft_slo), ITL_SLO=str(args.itl_slo), SCALE_DOWN_HOLD=str(args.hold),
                          SCALE_INTERVAL="0.5")
        warm = requests.post(f"{testbed.base_url}/generate", json={"inputs": "w5 w6", "parameters": {"max_new_tokens": 2}},
                             timeout=120)  # the first request pays for lazy set-up, in no policy's numbers
        warm.raise_for_status()
        testbed.wait_prebooted()  # every policy's scale-ups start in pre-booted processes, booted before the trace
        replay = Replay(testbed, times, args.prompt_tokens, args.new_tokens, args.seed)
        elapsed = replay.run()
        return summarise(policy, replay, elapsed, args.ttft_slo), replay
    finally:
        testbed.down()


def plot(runs: dict[str, Replay], times: list[float], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, replicas, ttft) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    bins = range(0, int(args.seconds) + 5, 5)
    rate.hist(times, bins=bins, weights=[1 / 5] * len(times), color="grey")
    rate.set_ylabel("arrivals / s")
    for policy, replay in runs.items():
        t = [s[0] for s in replay.replicas]
        replicas.step(t, [s[1] + s[2] for s in replay.replicas], where="post", label=policy)
        done = [r for r in replay.results if r["ttft"] is not None]
        ttft.scatter([r["at"] for r in done], [r["ttft"] for r in done], s=6, label=policy)
    replicas.set_ylabel("replicas (active + loading)")
    ttft.axhline(args.ttft_slo, color="red", linestyle="--", linewidth=1, label="TTFT SLO")
    ttft.set_ylabel("TTFT (s)")
    ttft.set_yscale("log")
    ttft.set_xlabel("seconds into the trace (by arrival)")
    replicas.legend()
    ttft.legend()
    figure.tight_layout()
    figure.savefig(path)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-rps", type=float, default=0.4)
    parser.add_argument("--burst-every", type=float, default=80)
    parser.add_argument("--burst-seconds", type=float, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step-ms", type=float, default=20, help="simulated device: ms per forward")
    parser.add_argument("--prefill-ms-per-token", type=float, default=3, help="simulated device: ms per prompt token")
    parser.add_argument("--ttft-slo", type=float, default=5.0)
    parser.add_argument("--itl-slo", type=float, default=0.5)
    parser.add_argument("--hold", type=float, default=20, help="--scale-down-hold of both policies")
    parser.add_argument("--policies", default="fixed,queue,slo")
    args = parser.parse_args()
    try:
        check_permitted()
    except NetnsUnavailable as error:
        print(f"autoscale_trace skipped: {error}")
        return 77
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    import torch

    from bench.random_model import write_random_model

    times = arrivals(args.seed, args.seconds, args.base_rps, args.burst_every, args.burst_seconds)
    print(f"trace: {len(times)} requests in {args.seconds:.0f} s (seed {args.seed})", flush=True)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="bzt-trace-model-") as scratch:
        model = str(write_random_model("tiny", Path(scratch) / "model", torch.float32))
        for policy in args.policies.split(","):
            row, replay = run_policy(policy, args, model, times)
            rows.append(row)
            runs[policy] = replay
            print(json.dumps(row), flush=True)
    fixed = next((r for r in rows if r["policy"] == "fixed"), None)
    for row in rows:
        if fixed and fixed["replica_seconds"]:
            row["replica_seconds_vs_fixed"] = round(row["replica_seconds"] / fixed["replica_seconds"], 3)
    from bench.common import print_table

    print()
    print_table(rows, ["policy", "requests", "failed", "ttft_p50", "ttft_p99", "itl_p99", "slo_windows",
                       "replica_seconds", "replica_seconds_vs_fixed", "max_replicas"])
    path = save("autoscale_trace", {"args": vars(args), "arrivals": times, "rows": rows,
                                    "replicas": {p: r.replicas for p, r in runs.items()},
                                    "requests": {p: r.results for p, r in runs.items()}})
    plot(runs, times, args, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
