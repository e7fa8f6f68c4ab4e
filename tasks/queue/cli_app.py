"""The Celery app for Celery's own command line, and for nothing else:

    celery -A tasks.queue.cli_app inspect active_queues
    celery -A tasks.queue.cli_app control cancel_consumer generation -d replica1@host

Celery's CLI can only import a module and find an app in it, so this one is built at import
time from the environment (REDIS_URL, ...). The service never imports this module: the web,
the control plane and the replicas build their apps with `make_celery(settings)`
(tests/test_layers.py checks that no module of ours imports it).
"""
from common.settings import Settings
from tasks.queue.celery_app import make_celery

app = make_celery(Settings.from_env())
