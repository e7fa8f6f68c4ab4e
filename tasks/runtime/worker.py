"""Run one replica: a Celery worker named `replica<slot>@<host>` (`<host>`: `--host-name`, which a
host agent passes on, else the machine's name) consuming its model's shared queue (`generation`, or
`generation:<model>` with several models: common/models.py; while active) and its own queue (always: the jobs prefix affinity sends it; the web moves them to the
shared queue when this replica is not active; tasks/client/affinity.py)."""
from __future__ import annotations

import logging
import os
import socket
import warnings

import redis
from celery import signals
from celery.exceptions import CPendingDeprecationWarning, SecurityWarning

from common.keys import replica_queue, slot_target_key
from common.settings import Settings
from common.states import ReplicaState
from tasks.queue.celery_app import make_celery
from tasks.runtime import generate
from tasks.runtime.lifecycle import claim_slot
from tasks.runtime.replica import run_in_worker

log = logging.getLogger(__name__)


def run_worker(settings: Settings, slot: int | None, loglevel: str = "INFO", standby: bool = False) -> None:
    """`slot` None: claim the lowest free slot (`--slot auto`, for `docker compose --scale`).
    `standby`: load the model but consume nothing until Celery's `add_consumer` says so."""
    if slot is None:
        slot = claim_slot(redis.Redis.from_url(settings.redis_url), owner=f"{socket.gethostname()}:{os.getpid()}")
    _set_target(settings, slot, ReplicaState.STANDBY if standby else ReplicaState.ACTIVE)
    model = settings.catalog.for_slot(slot)  # the slot's number says which model it serves (common/models.py)
    settings = settings.for_slot(slot)
    app = make_celery(settings)
    generate.register(app)
    run_in_worker(app, settings, slot)
    _quiet_celery_warnings()
    # Celery's logging setup puts its own `always` filters for its deprecation warnings in front
    # of ours (celery.app.log.Logging.setup): ours go in front again once it has run.
    signals.celeryd_after_setup.connect(lambda **_: _quiet_celery_warnings(), weak=False)
    name = f"replica{slot}@{settings.host}"  # what Celery names the worker, and its replica record
    queues = [replica_queue(name)] + ([] if standby else [model.queue])  # add_consumer adds the shared one
    app.worker_main([
        "--quiet",  # no banner: an operator's terminal shows our own lines (the replica's load line)
        "worker",
        "--hostname", name,
        "--pool", "threads",
        "--concurrency", str(settings.max_batch_size),  # one task thread per batch slot
        "--queues", ",".join(queues),
        "--loglevel", loglevel,
        "--without-mingle",
        "--without-gossip",
    ])


def _quiet_celery_warnings() -> None:
    """Celery warns on every start as root (containers run as root), and on every broker
    reconnect that running tasks are kept (which we want: the web fails over what is lost).
    Neither is for the operator's terminal."""
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning,
                            message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        warnings.filterwarnings("ignore", category=SecurityWarning)
        log.debug("running as root: Celery's SecurityWarning (superuser privileges) is silenced")


def _set_target(settings: Settings, slot: int, target: str) -> None:
    """A process started for a slot means to serve in it: a stale `stopped` target is replaced."""
    redis.Redis.from_url(settings.redis_url).set(slot_target_key(slot), target)
