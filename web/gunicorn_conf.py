"""Gunicorn server settings and hooks for the web: `gunicorn -c python:web.gunicorn_conf ... web.wsgi:app`
(bind, workers and threads stay on the command line, built from Settings by the CLI).

Logging: gunicorn's own logs and the app's go through one handler, as text or JSON lines
(LOG_FORMAT), and the access log line carries the request id (`x-request-id`).
"""
from __future__ import annotations

import os

from common.logs import logging_config

logconfig_dict = logging_config(
    os.environ.get("LOG_LEVEL") or "INFO", os.environ.get("LOG_FORMAT") or "text", gunicorn=True
)
# client, request line, status, bytes, duration (ms), request id
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s'


def child_exit(server, worker):
    """With PROMETHEUS_MULTIPROC_DIR set, drop the dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

        GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)
