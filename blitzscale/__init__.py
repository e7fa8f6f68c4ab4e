"""blitzscale: TGI-compatible text generation on Flask + Celery + Redis.

This package is the top layer: the `blitzscale` command (serve, web, worker, agent, autoscaler),
the supervision of the processes that `serve` starts, and the private Redis it may launch.
"""

from common import __version__  # noqa: F401  (the version lives in the leaf, where the web reads it)
