"""Scale-up 1 → N on the testbed's shaped links: BlitzScale's chain against every new replica
pulling from the source (a star), side by side in one run.

    python -m bench.chain_vs_star                       # 1 Gbit/s, 3 new replicas, 2 rounds
    python -m bench.chain_vs_star --rate 500mbit --new 2 --rounds 3

Needs root (bench.testbed). Hosts h0..hN, one CPU place each, every link shaped to --rate both
ways. Replica 0 on h0 holds the model (a random SmolLM2-135M in float32: 538 MB of safetensors,
so that one copy takes ~4.3 s at 1 Gbit/s, well above a replica's own start). Each round, every
new host's cache emptied first:

- one: one new replica (h1) from the source: the time a single copy and start take;
- chain: one `TriggerNormalUp` of N new replicas: placement chains them (h1 ← 0, h2 ← 1, ...);
- star: N commands of one replica each, sent at once: each new replica pulls from replica 0.

Measured: command → every new replica active, the bytes each source sent (the data planes'
counters in Redis). Writes bench/results/chain_vs_star-<rate>.json.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import print_table, save
from bench.testbed.fleet import Testbed
from bench.testbed.netns import NetnsUnavailable, check_permitted
from tasks.weights.sources import read_transfers

MODEL_DIR = Path(tempfile.gettempdir()) / "blitzscale-bench-models" / "smollm2-135m-random-f32"


def model_dir() -> Path:
    import torch

    from bench.random_model import write_random_model

    return write_random_model("smollm2-135m", MODEL_DIR, torch.float32)


def model_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and not f.name.startswith("."))


def scale_up(testbed: Testbed, connection: redis.Redis, mode: str, new: int) -> dict:
    """Empty the new hosts' caches, scale up, time every new replica to active, stop them."""
    slots = list(range(1, (1 if mode == "one" else new) + 1))
    for host in testbed.hosts[1:]:
        shutil.rmtree(testbed.cache(host) / "models", ignore_errors=True)
    # placement reads the caches from the agents' records (renewed every second): a stale one
    # would place every new replica on "its" cache, and no chain would form
    testbed.wait(lambda: all(not h["models"] for h in testbed.cluster()["hosts"] if h["host"] != "h0"),
                 "the new hosts' caches empty in their agents' records", timeout=30)
    testbed.wait_prebooted()  # each new replica starts in a pre-booted process, booted off the clock
    before = read_transfers(connection)
    started = time.perf_counter()
    if mode == "star":
        for slot in slots:  # each its own plan: replica 0 is every new replica's source
            testbed.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[slot])
    else:
        testbed.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=slots)
    ready: dict[int, float] = {}

    def all_active() -> bool:
        for replica in testbed.cluster()["replicas"]:
            if replica["slot"] in slots and replica["state"] == "active":
                ready.setdefault(replica["slot"], time.perf_counter() - started)
        return len(ready) == len(slots)

    testbed.wait(all_active, f"{mode}: {len(slots)} replicas active", timeout=300, poll=0.02)
    seconds = time.perf_counter() - started
    views = {r["slot"]: r for r in testbed.cluster()["replicas"]}
    sent = {k.removeprefix("bytes:"): int(v) - int(before.get(k, 0))
            for k, v in read_transfers(connection).items() if k.startswith("bytes:")}
    source = views[0]["name"]
    testbed.modify("TriggerNormalDown", stub_indices=slots)
    testbed.wait_states({slot: "stopped" for slot in slots}, timeout=120)
    testbed.wait(lambda: all(p["slot"] is None for h in testbed.cluster()["hosts"] if h["host"] != "h0"
                             for p in h["places"]), "the places free", timeout=60)
    return {"mode": mode, "new": len(slots), "all_active_s": round(seconds, 2),
            "each_s": [round(ready[s], 2) for s in slots],
            "source_sent_mb": round(sent.get(source, 0) / 1e6, 1), "copied_mb": round(sum(sent.values()) / 1e6, 1),
            "copy_s": [(views[s].get("transfer") or {}).get("seconds") for s in slots],
            "load_s": [views[s].get("load_seconds") for s in slots],
            "from": {f"{s}": (views[s].get("transfer") or {}).get("source") for s in slots}}


def summarise(rows: list[dict], size: int) -> tuple[dict, dict]:
    """Medians over the rounds: time to all active, the slowest copy, the bytes the source sent."""
    modes = ("one", "chain", "star")
    median = {m: statistics.median(r["all_active_s"] for r in rows if r["mode"] == m) for m in modes}
    copy = {m: statistics.median(max(r["copy_s"]) for r in rows if r["mode"] == m) for m in modes}
    sent = {m: statistics.median(r["source_sent_mb"] for r in rows if r["mode"] == m) for m in modes}
    return median, {"chain_over_one": round(median["chain"] / median["one"], 3),
                    "star_over_one": round(median["star"] / median["one"], 3),
                    "chain_copy_over_one": round(copy["chain"] / copy["one"], 3),
                    "star_copy_over_one": round(copy["star"] / copy["one"], 3),
                    "chain_source_sends_model_times": round(sent["chain"] * 1e6 / size, 2),
                    "star_source_sends_model_times": round(sent["star"] * 1e6 / size, 2)}


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--new", type=int, default=3, help="new replicas (hosts: one more)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every process (0: torch's default)")
    args = parser.parse_args()
    try:
        check_permitted()
    except NetnsUnavailable as error:
        print(f"chain_vs_star skipped: {error}")
        return 77
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    model = model_dir()
    size = model_bytes(model)
    testbed = Testbed(args.new + 1, args.rate, model, replicas={"h0": 1},
                      env={"MAX_BATCH_SIZE": "2", "PREBOOT": "1",  # new replicas in pre-booted processes
                           **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
    rows = []
    try:
        testbed.up(timeout=300)
        connection = redis.Redis.from_url(testbed.redis.url)
        scale_up(testbed, connection, "one", args.new)  # warm-up: the first start pays for cold file caches
        for round_ in range(args.rounds):
            modes = ("one", "chain", "star") if round_ % 2 == 0 else ("star", "chain", "one")
            for mode in modes:
                rows.append({"round": round_, **scale_up(testbed, connection, mode, args.new)})
                print_table(rows[-1:], list(rows[-1]))
                sys.stdout.flush()
    finally:
        testbed.down()
    print(f"\nmodel {size / 1e6:.0f} MB, links {args.rate}, {args.new} new replicas\n")
    print_table(rows, ["round", "mode", "new", "all_active_s", "each_s", "copy_s", "load_s", "source_sent_mb", "copied_mb"])
    median, summary = summarise(rows, size)
    print(f"\nmedian time to all active: one {median['one']:.2f} s, chain {median['chain']:.2f} s "
          f"({summary['chain_over_one']}x one; target <= 1.3), star {median['star']:.2f} s ({summary['star_over_one']}x)")
    print(f"the weights alone (the slowest copy): chain {summary['chain_copy_over_one']}x one copy, "
          f"star {summary['star_copy_over_one']}x")
    print(f"the source sent the model {summary['chain_source_sends_model_times']}x (chain), "
          f"{summary['star_source_sends_model_times']}x (star)")
    path = save(f"chain_vs_star-{args.rate}", {"rate": args.rate, "model_mb": round(size / 1e6, 1), "new": args.new,
                                  "rounds": rows, "median_s": median, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
