"""bench.serverless's parts on their own: the trace is seeded, Zipf-skewed and bursty (a model falls
idle long enough to be scaled to zero, then comes back); the replay client streams through the
real service and measures each request's TTFT; the report counts what a user sees (a request not
served misses the SLO); the plot is written."""
from __future__ import annotations

import statistics
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.serverless.plot import plot
from bench.serverless.replay import Outcome, Sample, Sampler, replay
from bench.serverless.report import (
    cold_starts_by_source, cold_starts_from_metrics, compare, replica_seconds, summarize,
)
from bench.serverless.trace import Arrival, TraceShape, load_trace, make_trace, save_trace

MODELS = ["m0", "m1", "m2", "m3", "m4", "m5"]


def test_the_trace_is_seeded_ordered_and_within_its_duration(tmp_path):
    shape = TraceShape(duration_s=180)
    trace = make_trace(MODELS, seed=7, shape=shape)
    assert trace == make_trace(MODELS, seed=7, shape=shape) != make_trace(MODELS, seed=8, shape=shape)
    assert [a.at for a in trace] == sorted(a.at for a in trace)
    assert 0 <= trace[0].at and trace[-1].at < shape.duration_s
    assert 0.5 * shape.rate * shape.duration_s < len(trace) < 2 * shape.rate * shape.duration_s
    save_trace(trace, tmp_path / "trace.json")
    assert load_trace(tmp_path / "trace.json") == trace


def test_the_trace_is_skewed_and_bursty_with_idle_gaps_to_scale_to_zero():
    trace = make_trace(MODELS, seed=0)
    counts = Counter(a.model for a in trace)
    ranked = [count for _, count in counts.most_common()]
    assert ranked[0] >= 4 * ranked[-1]  # Zipf: the top model gets several times the rarest one's
    busiest = [a.at for a in trace if a.model == counts.most_common(1)[0][0]]
    gaps = [b - a for a, b in zip(busiest, busiest[1:])]
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) > 1.3  # on/off: burstier than Poisson (1.0)
    def longest_silence_then_back(model: str) -> float:
        times = [a.at for a in trace if a.model == model]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    comebacks = [model for model in counts if longest_silence_then_back(model) > 20]
    assert comebacks  # some model falls idle > 20 s (scale to zero), then is asked again


def outcome(at, model="m0", ttft=0.5, status=200, tokens=4, error=None) -> Outcome:
    return Outcome(at, model, status, ttft, (ttft or 0) + 1, tokens, error)


def test_the_report_counts_every_request_and_misses_the_unserved():
    outcomes = [outcome(0, ttft=0.2), outcome(1, ttft=1.0), outcome(2, ttft=3.0), outcome(3, ttft=9.0),
                outcome(4, status=404, ttft=None, tokens=0, error="model not found"),
                outcome(5, status=None, ttft=None, tokens=0, error="ReadTimeout")]
    samples = [Sample(0.0, {"m0": 1}), Sample(10.0, {"m0": 2, "m1": 1}), Sample(20.0, {})]
    cold = [{"weight_origin": "host-cache", "host": "h0", "weight_host": "h0", "load_seconds": 3.0},
            {"weight_origin": "source", "load_seconds": 9.0},
            {"weight_origin": "host-cache", "host": "h0", "weight_host": "h1", "load_seconds": 5.0,
             "weight_seconds": 1.0},
            {"weight_origin": "host-cache", "host": "h1", "weight_host": "h0", "load_seconds": 7.0,
             "weight_seconds": 2.0}]
    summary = summarize(outcomes, samples, cold, end_s=30.0)
    assert (summary["requests"], summary["served"], summary["failed"]) == (6, 4, 2)
    assert summary["slo_attainment"] == round(2 / 6, 4)  # two of six within 2 s: the failures miss
    assert summary["ttft_p50_s"] in (1.0, 3.0) and summary["ttft_p99_s"] == 9.0
    assert summary["replica_seconds"] == 1 * 10 + 3 * 10 + 0 * 10
    assert summary["cold_starts"] == {  # a host cache: this host's (mapped) apart from another's (copied)
        "host-cache-local": {"count": 1, "median_s": 3.0, "max_s": 3.0, "weights_median_s": 0.0},
        "host-cache-remote": {"count": 2, "median_s": 6.0, "max_s": 7.0, "weights_median_s": 1.5},
        "source": {"count": 1, "median_s": 9.0, "max_s": 9.0, "weights_median_s": 0.0}}
    assert sum(summary["errors"].values()) == 2


def test_replica_seconds_hold_each_sample_until_the_next():
    assert replica_seconds([], 10) == 0
    assert replica_seconds([Sample(2.0, {"a": 2})], 5.0) == 6.0


def test_the_comparison_states_the_issues_targets():
    b = {"requests": 10, "served": 10, "ttft_p99_s": 8.0, "replica_seconds": 100.0}
    c = {"requests": 10, "served": 10, "ttft_p99_s": 3.0, "replica_seconds": 90.0,
         "cold_starts": {"host-cache-local": {"count": 2, "median_s": 4.0},
                         "host-cache-remote": {"count": 1, "median_s": 5.0}}}
    assert compare({"b": b, "c": c}) == {"c_serves_every_request": True, "ttft_p99_b_over_c": 2.67,
                                         "ttft_p99_target_met": True, "replica_seconds_c_over_b": 0.9,
                                         "replica_seconds_target_met": True, "cold_start_remote_over_local": 1.25,
                                         "cold_start_target_met": True}
    worse = compare({"b": b, "c": {**c, "served": 9, "ttft_p99_s": 5.0, "replica_seconds": 120.0}})
    assert not worse["c_serves_every_request"] and not worse["ttft_p99_target_met"]
    assert not worse["replica_seconds_target_met"]
    slow = compare({"b": b, "c": {**c, "cold_starts": {"host-cache-local": {"median_s": 4.0},
                                                       "host-cache-remote": {"median_s": 7.0}}}})
    assert (slow["cold_start_remote_over_local"], slow["cold_start_target_met"]) == (1.75, False)
    unmeasured = compare({"b": b, "c": {**c, "cold_starts": {"source": {"median_s": 9.0}}}})
    assert unmeasured["cold_start_remote_over_local"] is None and unmeasured["cold_start_target_met"] is None
    assert compare({"a": b}) == {}


def test_cold_start_seconds_are_read_from_the_services_histogram():
    registry = CollectorRegistry()
    histogram = Histogram("blitz_cold_start_seconds", "arrival → first token", ["model", "source"], registry=registry)
    histogram.labels("m0", "host-cache").observe(2.0)
    histogram.labels("m1", "host-cache").observe(4.0)
    histogram.labels("m1", "source").observe(10.0)
    assert cold_starts_from_metrics(generate_latest(registry).decode()) == {
        "host-cache": {"count": 2, "mean_s": 3.0}, "source": {"count": 1, "mean_s": 10.0}}
    assert cold_starts_from_metrics("# nothing here\n") == {}
    assert cold_starts_by_source([]) == {}


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")  # the test and bench extras install it
    outcomes = [outcome(t, model=f"m{t % 3}", ttft=0.1 * t) for t in range(20)] + [
        outcome(21, status=404, ttft=None, tokens=0, error="unknown")]
    samples = [Sample(float(t), {"m0": t % 3}) for t in range(25)]
    path = plot({"b": (outcomes, samples), "c": (outcomes[:5], samples[:5])}, tmp_path / "out" / "p.png",
                {"b": "(b)", "c": "(c)"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_sampler_counts_live_replicas_per_model_and_each_replica_once():
    sampler = Sampler("http://unused")
    views = [{"name": "replica0@h0", "pid": 10, "state": "active", "model": "m0", "weight_origin": "source"},
             {"name": "replica1@h1", "pid": 11, "state": "loading", "model": "m1"},
             {"name": "replica2@h1", "pid": 12, "state": "stopped", "model": "m2"}]
    sampler.record(1.0, views)
    sampler.record(2.0, views)
    assert sampler.samples == [Sample(1.0, {"m0": 1, "m1": 1}), Sample(2.0, {"m0": 1, "m1": 1})]
    assert list(sampler.replicas) == [("replica0@h0", 10)] and sampler.replicas[("replica0@h0", 10)]["seen_at"] == 1.0
    assert sampler.cold_starts() == []  # active from the first sample: no cold start of the replay
    sampler.record(3.0, [*views, {"name": "replica1@h1", "pid": 11, "state": "active", "model": "m1",
                                  "weight_origin": "host-cache"}])
    assert [(r["name"], r["weight_origin"]) for r in sampler.cold_starts()] == [("replica1@h1", "host-cache")]


def test_the_replay_streams_each_arrival_through_the_service(service):
    arrivals = [Arrival(0.1 * i, "m0", "The capital of France", 3) for i in range(4)]
    arrivals.append(Arrival(0.5, "m0", "Hello", 0))  # invalid: max_new_tokens must be > 0
    sampler = Sampler(service.base_url, period=0.1)
    outcomes = replay(service.base_url, arrivals, timeout_s=60, sampler=sampler)
    assert [o.at for o in outcomes] == [a.at for a in arrivals]
    good, bad = outcomes[:4], outcomes[4]
    assert all(o.served and o.tokens == 3 and 0 < o.ttft <= o.seconds for o in good)
    assert bad.status == 422 and not bad.served and bad.error
    assert sampler.samples and all(sum(s.replicas.values()) >= 1 for s in sampler.samples)
