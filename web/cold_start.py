"""The web's side of a cold start (docs/models.md): a request for a model with no serving replica
gets one placed at once (tasks/control/cold_start.py) and waits in its model's queue meanwhile;
when nothing can be freed it fails at once, naming what holds every place.

Each start a request causes is counted, `blitz_cold_starts_total{model,source}`, and timed from
the request's arrival to its first token, `blitz_cold_start_seconds{model,source}`; `source` is
where the new replica's weights came from, as it reports it: `replica` (a live peer), `host-cache`
(a host's cache, this one's or another's) or `source` (downloaded, converted, read from disk)."""
from __future__ import annotations

import logging
import time

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from common.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_TOKEN, FailureReason
from tasks.client.event_stream import serving
from tasks.client.generation_client import NoReplica
from tasks.control.cluster import ClusterControl, ClusterError, ScaleUpBlocked
from common.model_use import touch
from tasks.control.cold_start import NoPlace, ensure_replica, holders
from tasks.weights.sources import cold_start_source

log = logging.getLogger(__name__)

BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def weights_origin(record: dict) -> str:
    """The coarse source a replica reports; one that says only its fine `weight_source` is mapped."""
    return record.get("weight_origin") or cold_start_source(record.get("weight_source") or "")


class ColdStartMetrics:
    def __init__(self, registry: CollectorRegistry | None):
        self.starts = Counter("blitz_cold_starts", "Replicas started for a request whose model had none, by model "
                              "and where their weights came from", ["model", "source"], registry=registry)
        self.seconds = Histogram("blitz_cold_start_seconds", "A cold start's request arrival to first token (seconds)",
                                 ["model", "source"], buckets=BUCKETS, registry=registry)


class ColdStarter:
    def __init__(self, client, settings, registry: CollectorRegistry | None = None):
        self._client = client
        self._settings = settings
        self._control: ClusterControl | None = None
        self.metrics = ColdStartMetrics(registry)

    def control(self) -> ClusterControl:
        if self._control is None:  # sharing the client's Redis pool and Celery app
            self._control = ClusterControl(self._settings, self._client.redis, self._client.celery)
        return self._control

    def __call__(self, model: str) -> bool:
        """Get `model` a replica if it has none serving; True when this request started one."""
        touch(self._client.redis, model)
        if serving(self._client.replica_states(self._settings.replica_check_interval, model)):
            return False
        try:
            outcome = ensure_replica(self.control(), model)
        except (NoPlace, ScaleUpBlocked) as error:
            raise NoReplica(str(error)) from error
        except ClusterError as error:  # another request's start took the slot meanwhile: it comes
            log.info("cold start of %s: %s", model, error)
            return False
        except (redis.RedisError, OSError) as error:  # the lock or Redis busy: the autoscaler places it
            log.warning("cold start of %s not placed now (%s); the autoscaler will", model, error)
            return False
        if outcome == "serving":
            return False
        log.info("cold start of %s: %s", model, outcome)
        return True

    def timed(self, stream, model: str, arrived: float) -> "FirstToken":
        return FirstToken(stream, lambda replica: self._observe(model, replica, time.monotonic() - arrived),
                          self.places)

    def places(self) -> str:
        """What holds every place now (for a cold request that timed out in its queue)."""
        control = self.control()
        return holders(control, control.slots())

    def _observe(self, model: str, replica: str | None, seconds: float) -> None:
        record = self._client.replica_records(0).get(replica or "", {})
        source = weights_origin(record)
        self.metrics.starts.labels(model, source).inc()
        self.metrics.seconds.labels(model, source).observe(seconds)
        log.info("cold start of %s: first token after %.2f s (weights: %s, on %s)", model, seconds, source, replica)


class FirstToken:
    """A cold request's event stream: reports its first token (or its final answer) once; a queue
    timeout's error names what held every place meanwhile."""

    def __init__(self, stream, on_first, places=None):
        self._stream = stream
        self._on_first = on_first
        self._places = places

    def events(self, *args, **kwargs):
        for event in self._stream.events(*args, **kwargs):
            if event is not None and event.kind == EVENT_ERROR and event.reason == FailureReason.QUEUE_TIMEOUT \
                    and self._places is not None:
                try:
                    event.error = f"{event.error}; its model had no replica, and the places were held: {self._places()}"
                except Exception:  # the message stays as it was
                    log.exception("cannot name the places")
            if self._on_first is not None and event is not None and event.kind in (EVENT_TOKEN, EVENT_FINAL):
                on_first, self._on_first = self._on_first, None
                try:
                    on_first(self._stream.replica)
                except Exception:  # a metric must never fail the request
                    log.exception("cold start metric failed")
            yield event

    def __getattr__(self, name):
        return getattr(self._stream, name)
