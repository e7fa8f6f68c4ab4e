"""blitzscale: TGI-compatible text generation on Flask + Celery + Redis."""

__version__ = "0.1.0"
