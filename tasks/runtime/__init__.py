"""The replica runtime: one Celery worker process running one engine, its generate task, the
stream relay that publishes tokens, and the lifecycle it reports. The only layer that imports the engine."""
