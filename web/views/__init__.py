"""The HTTP routes, one flask-smorest blueprint per resource."""
from web.views import cluster, generate, health, info, metrics

BLUEPRINTS = (generate.blp, info.blp, health.blp, metrics.blp, cluster.blp)
