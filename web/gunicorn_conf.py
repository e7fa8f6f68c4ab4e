"""Gunicorn server hooks for the web: `gunicorn -c python:web.gunicorn_conf ... web.wsgi:app`
(bind, workers and threads stay on the command line, built from Settings by the CLI)."""
from __future__ import annotations

import os


def child_exit(server, worker):
    """With PROMETHEUS_MULTIPROC_DIR set, drop the dead worker's live gauges (tgi_queue_size)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

        GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)
