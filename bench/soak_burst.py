"""Bursts: N requests at once (half /generate, half /generate_stream, 16 new tokens each) at 1x, 2x
and 4x `--max-concurrent-requests`, then 4x of multi-choice OpenAI requests (/v1/completions, 4
prompts × `n` 2, half streamed), against one web process and against `--web-workers` of them.
What the service promises (docs/failure-policy.md): every admitted request succeeds, the excess
gets TGI's 429 `Model is overloaded`, nothing else, and each web process keeps a fixed number of
Redis connections (docs/request-path.md). Prints, per burst, the outcomes by reason, the web's own
count (`tgi_request_failure_total` by err and reason from /metrics) and the peak of each web
process's Redis connections (`CLIENT LIST`).

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

from bench.connections import ConnectionPeak
from bench.soak import PROMPTS, Cluster, request_outcome

MULTIPLES = (1, 2, 4)
REFUSED = "failed: 429 overloaded: Model is overloaded"
REFUSED_OPENAI = "failed: 429 rate_limit_error: Model is overloaded"


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
            bad += burst(cluster, 4 * args.max_concurrent_requests, args.max_concurrent_requests, choices_outcome)
        finally:
            cluster.stop()
        print(f"logs: {workdir}\n")
    return 1 if bad else 0


def tgi_outcome(base_url: str, n: int) -> str:
    return request_outcome(base_url, PROMPTS[n % len(PROMPTS)], {"max_new_tokens": 16}, bool(n % 2))


def choices_outcome(base_url: str, n: int) -> str:
    """A /v1/completions request with 4 prompts and `n` 2 (8 jobs), streamed when `n` is odd."""
    stream = bool(n % 2)
    body = {"model": "tgi", "prompt": [PROMPTS[(n + p) % len(PROMPTS)] for p in range(4)], "n": 2,
            "max_tokens": 16, "stream": stream}
    try:
        response = requests.post(f"{base_url}/v1/completions", json=body, stream=stream, timeout=300)
        if response.status_code != 200:
            error = response.json().get("error") or {}
            return f"failed: {response.status_code} {error.get('type')}: {error.get('message')}"
        if not stream:
            return "ok" if len(response.json().get("choices", [])) == 8 else "lost: fewer than 8 choices"
        lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
        if lines[-1:] != [b"data: [DONE]"] or any(b'"error"' in line for line in lines):
            return "failed: stream without [DONE] or with an error chunk"
        return "ok"
    except requests.RequestException as error:
        return f"lost: {type(error).__name__}"


def burst(cluster: Cluster, size: int, limit: int, outcome=tgi_outcome) -> int:
    """One burst; returns how many requests ended other than ok or 429."""
    before = failures(cluster.base_url)
    started = time.monotonic()
    with ConnectionPeak(cluster.redis.url) as peak, ThreadPoolExecutor(size) as pool:
        outcomes = Counter(pool.map(lambda n: outcome(cluster.base_url, n), range(size)))
    elapsed = time.monotonic() - started
    counted = failures(cluster.base_url) - before
    ok, refused = outcomes.pop("ok", 0), outcomes.pop(REFUSED, 0)
    refused += outcomes.pop(REFUSED_OPENAI, 0)
    kind = "multi-choice /v1/completions" if outcome is choices_outcome else "TGI requests"
    print(f"  {size:5d} {kind} at once ({size / limit:.0f}x): {ok} ok, {refused} refused (429), "
          f"{sum(outcomes.values())} other, in {elapsed:.1f} s; peak Redis connections per web process "
          f"{peak.highest} ({len(peak.per_process)} process(es))")
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
