"""The HTTP routes, one flask-smorest blueprint per resource."""
from web.views import cluster, generate, health, info, metrics, openai, tokenize

BLUEPRINTS = (generate.blp, openai.blp, openai.public, tokenize.blp, tokenize.public, info.blp, health.blp,
              metrics.blp, cluster.blp)
