"""Prometheus metrics on one `/metrics`: Flask's HTTP metrics (prometheus-flask-exporter), the
request metrics under TGI's names (Grafana dashboards built for TGI read them), and the metrics
each replica publishes in Redis (`common.keys.replica_metrics_key`), labelled by replica, and the
cluster gauges read from Redis at scrape time (`tgi_queue_size`, replicas by state:
web/cluster_metrics.py). One scrape target for the whole cluster.

Under gunicorn with several workers set PROMETHEUS_MULTIPROC_DIR: values then live in files
shared by the workers (see web/gunicorn_conf.py for the dead-worker hook).
"""
from __future__ import annotations

import copy
import logging
import os

import redis
from flask import Flask, g, has_request_context, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from common.keys import replica_metrics_pattern
from common.settings import Settings
from web.cluster_metrics import NAMES as CLUSTER_NAMES
from web.cluster_metrics import ClusterReader
from web.openai.errors import client_status
from web.redis_collector import STALE, RedisFigures, RedisReader
from web.scaling_metrics import NAMES as SCALING_NAMES
from web.scaling_metrics import ScalingReader
from web.weight_metrics import NAMES as WEIGHT_NAMES
from web.weight_metrics import WeightTransferReader

log = logging.getLogger(__name__)

DURATION_BUCKETS = tuple(0.0001 * 1.5**i for i in range(1, 36))  # TGI's: 0.15 ms .. ~220 s
# Families the web itself exports; a replica's family of the same name is not re-exported.
OWN_PREFIXES = ("tgi_request", "flask_", "process_", "python_", STALE, *CLUSTER_NAMES, *SCALING_NAMES,
                *WEIGHT_NAMES)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


def _linear_buckets(top: int, count: int = 20) -> tuple[float, ...]:
    return tuple(top * (i + 1) / count for i in range(count))


class TgiMetrics:
    """The request metrics TGI's router exports, under its names. With several models each has a
    `model` label (`for_model`: this object for one model's requests); with one, none, as TGI's."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None):
        model = ["model"] if settings.catalog.several else []
        self.model = settings.catalog.first.name if model else None

        def histogram(name, doc, buckets=DURATION_BUCKETS):
            return Histogram(name, doc, model, buckets=buckets, registry=registry)

        self.count = Counter("tgi_request_count", "Generation requests received", model, registry=registry)
        self.success = Counter("tgi_request_success", "Generation requests that succeeded", model, registry=registry)
        self.failure = Counter("tgi_request_failure", "Generation requests that failed, by TGI error type and reason",
                               ["err", "reason", *model], registry=registry)
        self.redeliveries = Counter(
            "blitz_request_redeliveries", "Requests re-enqueued because their replica died", model, registry=registry
        )
        self.duration = histogram("tgi_request_duration", "Request duration (seconds)")
        self.validation = histogram("tgi_request_validation_duration", "Validation duration (seconds)")
        self.queue = histogram("tgi_request_queue_duration", "Time in the queue (seconds)")
        self.inference = histogram("tgi_request_inference_duration", "Inference duration (seconds)")
        self.time_per_token = histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (seconds)"
        )
        self.input_length = histogram(
            "tgi_request_input_length", "Prompt tokens", _linear_buckets(settings.max_input_tokens)
        )
        self.generated_tokens = histogram(
            "tgi_request_generated_tokens", "Generated tokens", _linear_buckets(settings.max_total_tokens)
        )
        self.skipped_tokens = histogram(  # TGI's: tokens that came from accepted speculative drafts
            "tgi_request_skipped_tokens", "Speculated tokens", _linear_buckets(settings.max_total_tokens)
        )

    def for_model(self, name: str) -> "TgiMetrics":
        """The same metrics, counting under model `name`."""
        if self.model is None:
            return self
        bound = copy.copy(self)
        bound.model = name
        return bound

    def _of(self, metric, **labels):
        """`metric`, labelled with this object's model when the metrics have one."""
        if self.model is not None:
            labels["model"] = self.model
        return metric.labels(**labels) if labels else metric

    def request_received(self) -> None:
        self._of(self.count).inc()
        if has_request_context():
            g.tgi_received = True

    def request_validated(self, input_length: int) -> None:
        self._of(self.input_length).observe(input_length)

    def request_redelivered(self) -> None:
        self._of(self.redeliveries).inc()

    def request_failed(self, error, route: str | None = None) -> None:
        """Count a failed request (`error`: a web.errors.ApiError) under its error type and reason,
        and log it, once per request, at WARNING with its route (the current request's when
        None; a stream's body runs after its request context is gone) and status; the log
        line names the request id (common.logs)."""
        route = route or (request.path if has_request_context() else "-")
        error.counted = True
        self._of(self.failure, err=error.error_type, reason=str(error.reason)).inc()
        log.warning("request failed: %s answered %d %s (%s): %s", route, client_status(error, route),
                    error.error_type, error.reason, error.message)

    def refused_at_the_edge(self, error) -> None:
        """A generation request that an error handler answers (auth, schemas, body size, content
        type: before any view counted it): counted and logged as every other failure, once."""
        if getattr(error, "counted", False):
            return
        if not g.get("tgi_received"):
            self.request_received()
        self.request_failed(error)

    def request_succeeded(self, outcome) -> None:
        """`outcome`: a `web.responses.Outcome`."""
        self._of(self.success).inc()
        self._of(self.duration).observe(outcome.total_time)
        self._of(self.validation).observe(outcome.validation_time)
        self._of(self.queue).observe(outcome.queue_time)
        self._of(self.inference).observe(outcome.inference_time)
        self._of(self.time_per_token).observe(outcome.time_per_token)
        self._of(self.generated_tokens).observe(outcome.generated_tokens)
        self._of(self.skipped_tokens).observe(outcome.skipped_tokens)


class ReplicaMetricsReader(RedisReader):
    """Merges the replicas' published metrics (text format), adding a `replica` label."""

    source = "replica_metrics"

    def read(self, client):
        connection = client.redis
        keys = sorted(connection.scan_iter(match=replica_metrics_pattern(), count=100))
        values = connection.mget(keys) if keys else []
        return [(_text(key).rsplit(":", 1)[-1], _text(value)) for key, value in zip(keys, values) if value]

    def families(self, values):
        families: dict[str, Metric] = {}
        for replica, text in values:
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue  # one unreadable record must not break /metrics
            for family in parsed:
                if family.name.startswith(OWN_PREFIXES):
                    continue
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for s in family.samples:
                    labels = s.labels if "replica" in s.labels else {**s.labels, "replica": replica}
                    merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from families.values()


def redis_figures(client) -> RedisFigures:
    return RedisFigures(client, [ReplicaMetricsReader(), ClusterReader(), ScalingReader(), WeightTransferReader()])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Metrics:
    """One app's metrics: binds the Flask exporter and renders the /metrics page."""

    def __init__(self, app: Flask, settings: Settings, client):
        self._redis_figures = redis_figures(client)  # one, kept: it holds the last figures read
        self._multiprocess = multiprocess_mode()
        if self._multiprocess:
            exporter = GunicornInternalPrometheusMetrics.for_app_factory(path=None, group_by="endpoint")
            self.registry = None  # values are written to files; the page reads them back
        else:
            self.registry = CollectorRegistry()
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
            self.registry.register(self._redis_figures)
            exporter = PrometheusMetrics.for_app_factory(path=None, group_by="endpoint", registry=self.registry)
        exporter.init_app(app)
        self.exporter = exporter
        self.tgi = TgiMetrics(settings, self.registry)

    def for_model(self, name: str) -> "Metrics":
        """These metrics, with the request metrics counting under model `name` (several models)."""
        bound = copy.copy(self)
        bound.tgi = self.tgi.for_model(name)
        return bound

    def render(self) -> tuple[bytes, str]:
        registry = self.registry
        if self._multiprocess:  # every gunicorn worker's files, then what Redis holds
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self._redis_figures)
        return generate_latest(registry), CONTENT_TYPE_LATEST
