"""The engine's batch metrics, under TGI's names, and its prefix cache's, in a registry the
caller owns (a replica publishes its registry; tests read it directly)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, replica: str = "0"):
        self.registry = registry or CollectorRegistry()
        labels = ["replica"]
        self._replica = replica
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", labels, registry=self.registry)
        self.batch_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV positions held by the current batch", labels, registry=self.registry
        )
        self.inference_count = Counter(
            "tgi_batch_inference_count", "Inference calls", labels + ["method"], registry=self.registry
        )
        self.inference_success = Counter(
            "tgi_batch_inference_success", "Successful inference calls", labels + ["method"], registry=self.registry
        )
        self.inference_duration = Histogram(
            "tgi_batch_inference_duration", "Batch step duration (forward + sampling + detokenization), seconds",
            labels + ["method"], buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.forward_duration = Histogram(
            "tgi_batch_forward_duration", "Model forward duration, seconds",
            labels + ["method"], buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.spec_drafts = Counter("blitz_spec_decode_num_drafts", "Rows verified with draft tokens", labels,
                                   registry=self.registry)
        self.spec_draft_tokens = Counter("blitz_spec_decode_num_draft_tokens", "Draft tokens verified", labels,
                                         registry=self.registry)
        self.spec_accepted_tokens = Counter("blitz_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                            labels, registry=self.registry)
        for family in (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens):
            family.labels(replica)
        self.set_batch(0, 0)  # every series exists from the start: an idle replica shows zeros
        for method in ("prefill", "decode"):
            for family in (self.inference_count, self.inference_success, self.inference_duration,
                           self.forward_duration):
                family.labels(replica, method)

    def count_failure(self, method: str) -> None:
        """A step whose forward or sampling failed counts without success. (A step dropped
        unread, its batch changed meanwhile, counts as neither.)"""
        self.inference_count.labels(self._replica, method).inc()

    def observe_forward(self, method: str, seconds: float) -> None:
        self.forward_duration.labels(self._replica, method).observe(seconds)

    def observe_step(self, method: str, size: int, seconds: float) -> None:
        """A whole step (forward, sampling, detokenization, stop checks) for `size` requests went
        through: it counts, as a success."""
        self.inference_count.labels(self._replica, method).inc()
        self.inference_success.labels(self._replica, method).inc()
        self.inference_duration.labels(self._replica, method).observe(seconds)
        self.batch_size.labels(self._replica).set(size)

    def observe_drafts(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        """A verify step: `drafts` rows carried `draft_tokens` drafts, `accepted` of them matched."""
        self.spec_drafts.labels(self._replica).inc(drafts)
        self.spec_draft_tokens.labels(self._replica).inc(draft_tokens)
        self.spec_accepted_tokens.labels(self._replica).inc(accepted)

    def set_batch(self, size: int, tokens: int) -> None:
        self.batch_size.labels(self._replica).set(size)
        self.batch_max_tokens.labels(self._replica).set(tokens)

    def watch_prefix_cache(self, table) -> None:
        """Export the prefix cache's counts (an `engine.slot_table.SlotTable`), read at scrape time."""
        self.registry.register(PrefixCacheCollector(table, self._replica))


class PrefixCacheCollector(Collector):
    """The table keeps the counts; this reads them (no second counter kept in step by hand)."""

    def __init__(self, table, replica: str):
        self._table = table
        self._replica = replica

    def collect(self):
        table, replica = self._table, self._replica
        tokens = CounterMetricFamily("blitz_prefix_cache_tokens", "Prompt tokens by prefix cache result: hit (KV "
                                     "reused from a cached prefix) or miss (prefilled)", labels=["replica", "result"])
        tokens.add_metric([replica, "hit"], table.hit_tokens)
        tokens.add_metric([replica, "miss"], table.miss_tokens)
        cached = GaugeMetricFamily("blitz_prefix_cache_cached_tokens", "KV positions the free slots hold as prefix "
                                   "cache", labels=["replica"])
        cached.add_metric([replica], table.cached_tokens)
        slots = GaugeMetricFamily("blitz_prefix_cache_cached_slots", "Free KV slots holding a cached prefix",
                                  labels=["replica"])
        slots.add_metric([replica], table.cached_slots)
        return [tokens, cached, slots]
