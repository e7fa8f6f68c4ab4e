"""Everything Celery and Redis: the Celery app, the generate task, the stream protocol,
cluster state. The web imports only the client side (`tasks.client`); the engine is imported
inside replica processes only."""
