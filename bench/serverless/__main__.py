"""`python -m bench.serverless`: see the package's docstring."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, print_table, save
from bench.random_model import write_random_model
from bench.serverless.plot import plot
from bench.serverless.policies import Fleet, policies
from bench.serverless.replay import Sampler, replay
from bench.serverless.report import cold_starts_from_metrics, compare, summarize
from bench.serverless.trace import TraceShape, make_trace, save_trace
from common.settings import Settings
from tests.hub_server import StandInHub  # the tests' stand-in hub: a real local HTTP server, here the slow source

MODELS = {"m0": "tiny-s", "m1": "tiny-s", "m2": "tiny-m", "m3": "tiny-m", "m4": "tiny-l", "m5": "tiny-l"}
NEEDED = ("models", "scale_to_zero_after", "queue_timeout")  # settings of the multi-model service


def missing_settings() -> list[str]:
    have = {f.name for f in dataclasses.fields(Settings)}
    return [name for name in NEEDED if name not in have]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=180.0, help="the trace's length, seconds")
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests/s over all models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="a,b,c", help="which, in this order (reverse it on a repeat: "
                        "the shared machine's load then falls on each alike)")
    parser.add_argument("--tag", default="", help="results as serverless-TAG.json/.png (a repeat keeps the first)")
    parser.add_argument("--scale-to-zero-after", type=float, default=20.0)
    parser.add_argument("--host-cache-mb", type=int, default=300, help="each host's --host-cache-bytes, MB")
    parser.add_argument("--hub-mbps", type=float, default=40.0, help="the source's bandwidth per download, MB/s")
    parser.add_argument("--queue-timeout", type=float, default=120.0)
    args = parser.parse_args()
    if missing := missing_settings():
        sys.exit(f"bench.serverless needs the multi-model service's settings ({', '.join(missing)} are missing "
                 "here: --models, --min-replicas 0, --scale-to-zero-after, the target-model header); not run")
    workdir = Path(tempfile.mkdtemp(prefix="bench-serverless-"))
    directories = {name: write_random_model(arch, workdir / "models" / name, torch.float32)
                   for name, arch in MODELS.items()}
    repos = {name: f"bench/{name}" for name in MODELS}
    trace = make_trace(list(MODELS), args.seed, TraceShape(duration_s=args.duration, rate=args.rate))
    save_trace(trace, workdir / "trace.json")
    print(f"{len(trace)} requests over {args.duration:.0f} s; models: {MODELS}; workdir {workdir}")
    by_name = {p.name: p for p in policies(args.scale_to_zero_after, args.host_cache_mb << 20)}
    chosen = [by_name[name] for name in args.policies.split(",")]
    results, series = {}, {}
    with StandInHub({repos[name]: directory for name, directory in directories.items()},
                    rate=args.hub_mbps * 1e6) as hub:
        for policy in chosen:
            fleet = Fleet(policy, repos, hub.url, workdir / policy.name, args.queue_timeout).start()
            try:
                sampler = Sampler(fleet.base_url)
                load_before = os.getloadavg()[0]  # the machine is shared: its load goes with the numbers
                started = time.monotonic()
                outcomes = replay(fleet.base_url, trace, timeout_s=args.queue_timeout + 60, sampler=sampler)
                end = time.monotonic() - started
                results[policy.name] = {"title": policy.title,
                                        **summarize(outcomes, sampler.samples, sampler.cold_starts(), end),
                                        "cold_start_metric": cold_starts_from_metrics(fleet.metrics()),
                                        "load_average_1m": {"start": round(load_before, 2),
                                                            "end": round(os.getloadavg()[0], 2)}}
                series[policy.name] = (outcomes, sampler.samples)
            finally:
                fleet.close()
            print_table([{"policy": policy.name, **{k: v for k, v in results[policy.name].items()
                                                     if k not in ("title", "errors", "cold_starts", "cold_start_metric",
                                                                  "load_average_1m")}}],
                        ["policy", "requests", "served", "failed", "ttft_p50_s", "ttft_p99_s", "slo_attainment",
                         "replica_seconds"])
            print("cold starts by source (load: weights obtained + model built, after the process boot): "
                  f"{results[policy.name]['cold_starts']}; "
                  f"the web's (arrival → first token): {results[policy.name]['cold_start_metric']}; "
                  f"errors: {results[policy.name]['errors']}", flush=True)
    checks = compare(results)
    print(checks)
    name = f"serverless-{args.tag}" if args.tag else "serverless"
    path = save(name, {"args": vars(args), "models": MODELS, "requests": len(trace), "policies": results,
                               "checks": checks})
    picture = plot(series, RESULTS_DIR / f"{name}.png", {p.name: p.title for p in chosen})
    for bulky in [workdir / "models", *workdir.glob("*/cache-*"), *workdir.glob("*/hf-*")]:
        shutil.rmtree(bulky, ignore_errors=True)  # the models and their copies; the logs stay
    print(f"wrote {path} and {picture}; logs in {workdir}")


if __name__ == "__main__":
    main()
