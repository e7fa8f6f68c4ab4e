"""The HTTP routes, one flask-smorest blueprint per resource."""
from web.views import cluster, generate, health, info, metrics, openai

BLUEPRINTS = (generate.blp, openai.blp, openai.public, info.blp, health.blp, metrics.blp, cluster.blp)
