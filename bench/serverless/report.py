"""What a policy's replay comes to: requests served, TTFT p50/p99, SLO attainment, cold starts by
source, replica-seconds; and the issue's comparison of the three policies.

SLO attainment counts every request of the trace: one not served (refused, timed out) misses.
"""
from __future__ import annotations

import statistics

from prometheus_client.parser import text_string_to_metric_families

from bench.common import percentile
from bench.serverless.replay import Outcome, Sample

SLO_TTFT_S = 2.0


def summarize(outcomes: list[Outcome], samples: list[Sample], cold_starts: list[dict], end_s: float,
              slo_s: float = SLO_TTFT_S) -> dict:
    served = [o for o in outcomes if o.served]
    ttfts = [o.ttft for o in served]
    return {
        "requests": len(outcomes),
        "served": len(served),
        "failed": len(outcomes) - len(served),
        "errors": _top_errors(outcomes),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
        "slo_attainment": round(sum(o.ttft <= slo_s for o in served) / len(outcomes), 4) if outcomes else None,
        "cold_starts": cold_starts_by_source(cold_starts),
        "replica_seconds": round(replica_seconds(samples, end_s), 1),
    }


def _top_errors(outcomes: list[Outcome], top: int = 3) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if not outcome.served:
            key = f"{outcome.status}: {(outcome.error or 'no tokens')[:80]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def replica_seconds(samples: list[Sample], end_s: float) -> float:
    """The integral of live replicas (all models) over time: each sample holds until the next."""
    total = 0.0
    for sample, following in zip(samples, [*samples[1:], None]):
        until = following.t if following is not None else end_s
        total += sum(sample.replicas.values()) * max(0.0, until - sample.t)
    return total


LOCAL_CACHE, REMOTE_CACHE = "host-cache-local", "host-cache-remote"


def cold_start_label(replica: dict) -> str:
    """`weight_origin` (replica | host-cache | source), a host cache split in two: this host's
    (`weight_host` is the replica's own host: mapped) or another host's (copied over the network)."""
    origin = replica.get("weight_origin") or "source"
    if origin != "host-cache":
        return origin
    return LOCAL_CACHE if replica.get("weight_host") in (None, replica.get("host")) else REMOTE_CACHE


def cold_starts_by_source(replicas: list[dict]) -> dict[str, dict]:
    """Replicas started during the replay, by where their weights came from (`cold_start_label`),
    with their load seconds (`load_seconds`: weights obtained and the model built, once the process
    has booted; its boot, Python and torch imports, is not in it) and the weights' part of them."""
    by_source: dict[str, list[tuple[float, float]]] = {}
    for replica in replicas:
        by_source.setdefault(cold_start_label(replica), []).append(
            (float(replica.get("load_seconds") or 0.0), float(replica.get("weight_seconds") or 0.0)))
    return {source: {"count": len(pairs), "median_s": round(statistics.median(p[0] for p in pairs), 2),
                     "max_s": round(max(p[0] for p in pairs), 2),
                     "weights_median_s": round(statistics.median(p[1] for p in pairs), 3)}
            for source, pairs in sorted(by_source.items())}


def compare(results: dict[str, dict]) -> dict:
    """The issue's targets: (c) serves every request; its TTFT p99 at least 2× lower than (b)'s at
    no more replica-seconds; in (c), a cold start from another host's cache takes at most 1.5× one
    from this host's (medians; None: (c) made no start of one kind or the other, not measured)."""
    b, c = results.get("b"), results.get("c")
    if not b or not c:
        return {}
    ratio = b["ttft_p99_s"] / c["ttft_p99_s"] if b.get("ttft_p99_s") and c.get("ttft_p99_s") else None
    return {
        "c_serves_every_request": c["served"] == c["requests"],
        "ttft_p99_b_over_c": round(ratio, 2) if ratio else None,
        "ttft_p99_target_met": bool(ratio and ratio >= 2.0),
        "replica_seconds_c_over_b": round(c["replica_seconds"] / b["replica_seconds"], 2) if b["replica_seconds"] else None,
        "replica_seconds_target_met": c["replica_seconds"] <= b["replica_seconds"],
        **_remote_over_local(c.get("cold_starts") or {}),
    }


def _remote_over_local(cold_starts: dict[str, dict], target: float = 1.5) -> dict:
    local, remote = cold_starts.get(LOCAL_CACHE), cold_starts.get(REMOTE_CACHE)
    if not local or not remote or not local.get("median_s"):
        return {"cold_start_remote_over_local": None, "cold_start_target_met": None}
    ratio = remote["median_s"] / local["median_s"]
    return {"cold_start_remote_over_local": round(ratio, 2), "cold_start_target_met": ratio <= target}


def cold_starts_from_metrics(text: str) -> dict[str, dict]:
    """`blitz_cold_start_seconds{model,source}` (request arrival → first token, the web's
    histogram) summed by source: count and mean seconds. Empty when the service has no such metric."""
    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "blitz_cold_start_seconds":
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind in ("sum", "count"):
                totals = sums.setdefault(sample.labels.get("source", "?"), [0.0, 0.0])
                totals[0 if kind == "sum" else 1] += sample.value
    return {source: {"count": int(count), "mean_s": round(total / count, 2) if count else None}
            for source, (total, count) in sorted(sums.items())}
