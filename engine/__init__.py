"""The model side: loading, continuous batching, sampling, detokenization.

Knows nothing of Celery, Redis or HTTP (docs/architecture.md): `Engine.submit(request)` returns an
iterator of `TokenEvent`s, `Engine.cancel(request_id)` stops one early.
"""
