"""Run one replica: a Celery worker named `replica<slot>@<host>` consuming the generation queue."""
from __future__ import annotations

import os
import socket

from blitzscale.settings import Settings
from tasks.keys import GENERATION_QUEUE, slot_target_key
from tasks.lifecycle import ACTIVE, STANDBY
from tasks.replica import SLOT_ENV


def run_worker(settings: Settings, slot: int | None, loglevel: str = "INFO", standby: bool = False) -> None:
    """`slot` None: claim the lowest free slot (`--slot auto`, for `docker compose --scale`).
    `standby`: load the model but consume nothing until Celery's `add_consumer` says so."""
    os.environ.update(settings.to_env())
    if slot is None:
        import redis

        from tasks.lifecycle import claim_slot

        slot = claim_slot(redis.Redis.from_url(settings.redis_url), owner=f"{socket.gethostname()}:{os.getpid()}")
    os.environ[SLOT_ENV] = str(slot)
    _set_target(settings, slot, STANDBY if standby else ACTIVE)
    from tasks.celery_app import app  # built from the environment just exported

    app.worker_main([
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner among JSON lines
        "worker",
        "--hostname", f"replica{slot}@%h",
        "--pool", "threads",
        "--concurrency", str(settings.max_batch_size),  # one task thread per batch slot
        *(["--exclude-queues", GENERATION_QUEUE] if standby else ["--queues", GENERATION_QUEUE]),
        "--loglevel", loglevel,
        "--without-mingle",
        "--without-gossip",
    ])


def _set_target(settings: Settings, slot: int, target: str) -> None:
    """A process started for a slot means to serve in it: a stale `stopped` target is replaced."""
    import redis

    redis.Redis.from_url(settings.redis_url).set(slot_target_key(slot), target)
