"""The queue itself: the Celery app factory (`make_celery(settings)`) and the kombu transport it uses."""
