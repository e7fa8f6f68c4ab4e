"""The Celery app, built from settings in one place: `make_celery(settings)`.

Nothing here is built at import time: the web's client, the control plane and each replica
worker build their own app from the settings they were given (a replica registers its generate
task on it: tasks.runtime.worker). Celery's own command line (`celery -A ... inspect`) can only
import a module, so it has `tasks.queue.cli_app`, built from the environment for that use only.
"""
from __future__ import annotations

import ssl

from celery import Celery

from common.keys import GENERATION_QUEUE
from common.settings import Settings
from tasks.queue.broker import TRANSPORT

GENERATE_TASK = "blitzscale.generate"


def make_celery(settings: Settings) -> Celery:
    # The web enqueues by task name; only a replica's worker registers the task itself.
    broker = settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery("blitzscale", broker=broker)
    app.conf.update(
        # kombu's Redis transport, surviving a Redis restart (tasks/queue/broker.py), for rediss:// too
        broker_transport=TRANSPORT if broker.startswith(("redis://", "rediss://")) else None,
        # rediss:// checks the server's certificate, as redis-py does (kombu alone would not), unless
        # the URL's ssl_* parameters say otherwise (they replace this)
        broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED} if broker.startswith("rediss://") else None,
        task_default_queue=GENERATION_QUEUE,
        task_ignore_result=True,  # results travel on the stream channel, not a result backend
        task_acks_late=True,  # a job whose replica dies stays unacked (the web re-enqueues it: tasks.client)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a replica holds at most its batch slots of jobs
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than the longest generation, so a slow job is not redelivered while running.
            "visibility_timeout": int(settings.request_timeout * 2),
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app

