"""One replica = one Celery worker process = one engine.

The worker loads its model in `worker_init` (before it consumes anything), then a heartbeat
thread keeps the replica's record (state, device, load facts, batch occupancy) and its engine
metrics in Redis with a short expiry: a replica that dies is shown `dead` in the cluster view
within `heartbeat_ttl` seconds. Its state (active, draining, standby) follows its Celery consumer:
see tasks/runtime/lifecycle.py.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import redis
from celery import Celery, signals
from prometheus_client import generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import hub, model_files, replica_start
from common.keys import replica_key, replica_metrics_key
from common.settings import Settings
from tasks.runtime.lifecycle import Lifecycle
from tasks.runtime.peer_weights import Obtained, ReplicaWeights
from tasks.runtime.stream_relay import StreamRelay
from tasks.weights.sources import cold_start_source

log = logging.getLogger(__name__)

CANNOT_LOAD_EXIT = 3  # a replica whose model or adapters cannot load: a configuration error


class Replica:
    def __init__(self, settings: Settings, slot: int, name: str, worker=None,
                 shutdown: Callable[[str], None] | None = None):
        """`shutdown(name)`: sends Celery's shutdown to the named worker (this one, once drained
        with a `stopped` slot target)."""
        self.settings = settings
        self.slot = slot
        self.name = name
        self.worker = worker  # the Celery WorkController: its consumer tells active from standby
        self.loaded = False
        self.lifecycle = Lifecycle(self, shutdown=shutdown or _cannot_shut_down)
        self.engine = None
        self.relay = None
        self.facts: dict = {}
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.weights = ReplicaWeights(settings, slot, name, self.redis)  # host cache, peers, data plane
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="replica-heartbeat", daemon=True)

    @property
    def state(self) -> str:
        return self.lifecycle.state

    @property
    def device_name(self) -> str | None:
        """Its place as its host agent names it (`cuda:3`), else the device it loaded on."""
        return self.settings.device_name or self.facts.get("device")

    def start(self) -> None:
        self.weights.start()  # before the first record: it advertises the data plane
        self._heartbeat.start()
        self.load()
        self.loaded = True  # the lifecycle thread publishes the next state (active or standby)

    def load(self) -> None:
        # The only torch-using module of the runtime, imported when the model loads: importing the
        # replica runtime (the CLI, Celery's tools) stays light (tasks/runtime/engine_builder.py).
        from tasks.runtime.engine_builder import build_engine, prepare_weights

        s = self.settings
        started = time.perf_counter()
        source = model_files.resolve_for_start(s)  # a hub model missing here: its commit, not yet its files
        target = model_files.prepared_dir(s, source)

        def prepare_locally():
            return download_weights(s, source) if source.is_download else prepare_weights(source, target)

        prepared = self.weights.obtain(source, prepare_locally)
        self.relay = StreamRelay(
            _relay_connection(s), cancel=lambda request_id: self.engine.cancel(request_id),
            alive_interval=min(s.keep_alive_interval, s.replica_silence_timeout / 4),
            stall_after=s.replica_silence_timeout, give_up_after=s.replica_silence_timeout,
        )
        built = build_engine(s, self.slot, prepared.directory, self.weights, self.name, self.relay.on_step)
        self.engine, device, adapters = built.engine, built.device, built.adapters
        stats = self.engine.stats()
        self.facts = {
            "model_id": s.model_id,
            "model_sha": source.sha,
            "dtype": built.dtype,
            "device": s.device_name or str(device),  # as the agent names the place; the process sees `torch_device`
            "torch_device": str(device),
            "device_type": device.type,
            "weight_source": prepared.source,
            "weight_origin": cold_start_source(prepared.source),  # replica | host-cache | source
            "weight_host": prepared.host,
            "weight_seconds": round(prepared.seconds, 3),
            "load_seconds": round(time.perf_counter() - started, 3),
            "kv_slots": stats.kv_slots,
            "cuda_graphs": stats.cuda_graphs,
            "graph_capture_seconds": round(stats.graph_capture_seconds, 3),
            "lora_adapters": [adapter.name for adapter in adapters],
            **replica_start.start_facts(),  # start_path (preboot | fresh), start_seconds: the agent's start to now
        }
        started_by = self.facts.get("start_path")
        log.info("replica %s loaded %s on %s in %.1f s (weights: %s from %s)%s", self.name, s.model_id, device,
                 self.facts["load_seconds"], prepared.source, prepared.host,
                 f"; {'pre-booted' if started_by == replica_start.PREBOOT else 'fresh'} process, "
                 f"{self.facts['start_seconds']:.1f} s from its start" if "start_seconds" in self.facts else "")

    def record(self) -> dict:
        stats = self.engine.stats() if self.engine else None
        return {
            "slot": self.slot,
            "name": self.name,
            "model": self.settings.served_model,
            "host": self.settings.host,
            "device": self.device_name,
            "pid": os.getpid(),
            "state": self.state,
            "running": stats.running if stats else 0,
            "waiting": stats.waiting if stats else 0,
            "batch_tokens": stats.batch_tokens if stats else 0,
            "max_batch_size": self.settings.max_batch_size,
            "max_batch_total_tokens": stats.max_batch_total_tokens if stats else self.settings.max_batch_total_tokens,
            "updated_at": time.time(),
            "prefix_cache": _prefix_cache(stats) if stats else None,
            **(_slo_inputs(stats, self.engine.metrics.registry, self.name) if stats else {}),
            "speculation": _speculation(stats) if stats else None,
            **self.weights.record(),
            **self.facts,
        }

    def publish_record(self) -> None:
        ttl = max(1, int(self.settings.heartbeat_ttl))
        pipe = self.redis.pipeline()
        pipe.set(replica_key(self.name), json.dumps(self.record()), ex=ttl)
        if self.engine is not None:
            pipe.set(replica_metrics_key(self.name), generate_latest(self.engine.metrics.registry), ex=ttl)
        pipe.execute()

    def stop(self) -> None:
        self._stop.set()
        self.lifecycle.stopped()
        if self.engine is not None:
            self.engine.stop()
        if self.relay is not None:
            self.relay.stop()  # what the engine's stop failed goes out first
        self.weights.stop()
        try:
            self.redis.delete(replica_key(self.name), replica_metrics_key(self.name))
        except redis.RedisError:
            pass

    def stop_unloaded(self, reason: str) -> None:
        """Stop after a failed load; the slot then shows `dead` with `reason` (not `stopped`,
        which the heartbeat's last word or `stop()` would leave)."""
        self.stop()
        if self._heartbeat.is_alive():
            self._heartbeat.join(2)
        self.lifecycle.cannot_load(reason)

    def _beat(self) -> None:
        self.lifecycle.run(self._stop, self.settings.heartbeat_interval)


def _prefix_cache(stats) -> dict:
    """The prefix cache's counts for /cluster_state (tokens since start; cached: held now)."""
    looked_up = stats.prefix_hit_tokens + stats.prefix_miss_tokens
    return {"enabled": stats.prefix_caching, "hit_tokens": stats.prefix_hit_tokens,
            "miss_tokens": stats.prefix_miss_tokens,
            "hit_rate": round(stats.prefix_hit_tokens / looked_up, 4) if looked_up else 0.0,
            "cached_tokens": stats.prefix_cached_tokens, "cached_slots": stats.prefix_cached_slots}


def _speculation(stats) -> dict:
    """Speculative decoding's counts for /cluster_state (since start)."""
    drafted, accepted = stats.spec_draft_tokens, stats.spec_accepted_tokens
    return {"speculate": stats.speculate, "drafter": stats.spec_drafter, "drafts": stats.spec_drafts,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0}


def download_weights(settings: Settings, source: model_files.ModelSource) -> Obtained:
    """A hub model that no peer or host cache had: downloaded from the hub, at the commit the
    replica is named by (`source.sha`, its identity for peers and host caches) even if its branch
    moved on since; by the branch first, so that an offline restart finds the model by it."""
    started = time.perf_counter()
    snapshot = hub.ensure_model(settings.model_id, settings.revision)
    if snapshot.name != source.sha:  # a snapshot directory is named by its commit
        log.warning("%s moved from %s to %s while this replica started: downloading %s", settings.revision or "main",
                    source.sha[:12], snapshot.name[:12], source.sha[:12])
        snapshot = hub.ensure_model(settings.model_id, source.sha)
    return Obtained(snapshot, model_files.DOWNLOAD, time.perf_counter() - started)


def _relay_connection(settings: Settings) -> redis.Redis:
    """The relay's own client: it retries with its own bounded policy (tasks.runtime.stream_relay), so
    redis-py's retries with their seconds of backoff are off."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=3,
                                retry=Retry(NoBackoff(), 0))


_replica: Replica | None = None


def current_replica() -> Replica:
    if _replica is None or _replica.engine is None:
        raise RuntimeError("this worker has no loaded replica")
    return _replica


def run_in_worker(app: Celery, settings: Settings, slot: int) -> None:
    """This process's replica: loaded when its Celery worker starts (before it consumes
    anything), stopped when the worker stops."""

    def load(sender=None, **_):
        global _replica
        name = getattr(sender, "hostname", None) or f"replica{slot}@{settings.host}"
        _replica = Replica(settings, slot, name, worker=sender,
                           shutdown=lambda worker: app.control.shutdown(destination=[worker]))
        try:
            _replica.start()
        except Exception as error:  # e.g. a LoRA adapter that does not fit: refuse to start, saying why
            log.error("replica %s cannot start: %s", name, error, exc_info=not isinstance(error, ValueError))
            _replica.stop_unloaded(load_error_line(error))
            raise SystemExit(CANNOT_LOAD_EXIT) from error  # not an Exception: Celery's dispatch lets it end the worker

    def stop(**_):
        if _replica is not None:
            _replica.stop()

    signals.worker_init.connect(load, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)


def load_error_line(error: BaseException) -> str:
    """What an operator reads about a model or adapter that cannot load: one line."""
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return message if isinstance(error, ValueError) else f"{type(error).__name__}: {message}"


def _cannot_shut_down(name: str) -> None:
    log.warning("replica %s was told to stop, but runs without a Celery worker to shut down", name)


def _slo_inputs(stats, registry, name: str) -> dict:
    """What the SLO autoscaler measures from (tasks/control/slo_observe.py): prompt tokens waiting,
    and since the start the prompt tokens prefilled and the seconds and steps spent on prefill
    and on decode (the autoscaler takes rates from the differences between heartbeats)."""
    def total(suffix: str, method: str) -> float:
        return registry.get_sample_value(f"tgi_batch_inference_duration_{suffix}", {"replica": name, "method": method}) or 0.0

    return {"waiting_tokens": stats.waiting_tokens, "prefill_tokens": stats.prefix_miss_tokens,
            "prefill_seconds": round(total("sum", "prefill"), 4), "decode_seconds": round(total("sum", "decode"), 4),
            "decode_steps": int(total("count", "decode"))}
