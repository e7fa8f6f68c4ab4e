"""Bursts: N requests at once (half /generate, half /generate_stream, 16 new tokens each) at 1x, 2x
and 4x `--max-concurrent-requests`, against one web process and against `--web-workers` of them.
What the service promises (docs/failure-policy.md): every admitted request succeeds, the excess
gets TGI's 429 `Model is overloaded`, nothing else. Prints, per burst, the outcomes by reason and
the web's own count (`tgi_request_failure_total` by err and reason from /metrics).

    .venv/bin/python -m bench.soak --burst
    .venv/bin/python -m bench.soak --burst --max-concurrent-requests 256 --max-batch-size 128 --web-workers 4
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.soak import PROMPTS, Cluster, request_outcome

MULTIPLES = (1, 2, 4)
REFUSED = "failed: 429 overloaded: Model is overloaded"


def run_bursts(args) -> int:
    env = {"MAX_CONCURRENT_REQUESTS": str(args.max_concurrent_requests), "MAX_BATCH_SIZE": str(args.max_batch_size)}
    bad = 0
    for web_workers in sorted({1, args.web_workers}):
        workdir = Path(tempfile.mkdtemp(prefix="blitzscale-burst-"))
        cluster = Cluster(args.model_id, 1, web_workers, workdir, env=env)
        try:
            cluster.start()
            print(f"burst: model {args.model_id or 'default'}, 1 replica (max batch {args.max_batch_size}), "
                  f"{web_workers} web worker(s), --max-concurrent-requests {args.max_concurrent_requests}")
            for multiple in MULTIPLES:
                bad += burst(cluster, multiple * args.max_concurrent_requests, args.max_concurrent_requests)
        finally:
            cluster.stop()
        print(f"logs: {workdir}\n")
    return 1 if bad else 0


def burst(cluster: Cluster, size: int, limit: int) -> int:
    """One burst; returns how many requests ended other than ok or 429."""
    before = failures(cluster.base_url)
    started = time.monotonic()
    with ThreadPoolExecutor(size) as pool:
        outcomes = Counter(pool.map(lambda n: request_outcome(
            cluster.base_url, PROMPTS[n % len(PROMPTS)], {"max_new_tokens": 16}, bool(n % 2)), range(size)))
    elapsed = time.monotonic() - started
    counted = failures(cluster.base_url) - before
    ok, refused = outcomes.pop("ok", 0), outcomes.pop(REFUSED, 0)
    print(f"  {size:5d} at once ({size / limit:.0f}x): {ok} ok, {refused} refused (429), "
          f"{sum(outcomes.values())} other, in {elapsed:.1f} s")
    for reason, count in outcomes.most_common():
        print(f"        {count:5d}  {reason}")
    print(f"        /metrics counted: {dict(counted) or 'no failure'}")
    return sum(outcomes.values())


def failures(base_url: str) -> Counter:
    """(err, reason) -> count of tgi_request_failure_total, as the web counts them."""
    text = requests.get(f"{base_url}/metrics", timeout=30).text
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "tgi_request_failure":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[(sample.labels.get("err"), sample.labels.get("reason"))] += int(sample.value)
    return counts
