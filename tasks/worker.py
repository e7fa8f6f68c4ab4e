"""Run one replica: a Celery worker named `replica<slot>@<host>` consuming the generation queue."""
from __future__ import annotations

import os

from blitzscale.settings import Settings
from tasks.keys import GENERATION_QUEUE
from tasks.replica import SLOT_ENV


def run_worker(settings: Settings, slot: int, loglevel: str = "INFO") -> None:
    os.environ.update(settings.to_env())
    os.environ[SLOT_ENV] = str(slot)
    from tasks.celery_app import app  # built from the environment just exported

    app.worker_main([
        "worker",
        "--hostname", f"replica{slot}@%h",
        "--pool", "threads",
        "--concurrency", str(settings.max_batch_size),  # one task thread per batch slot
        "--queues", GENERATION_QUEUE,
        "--loglevel", loglevel,
        "--without-mingle",
        "--without-gossip",
    ])
