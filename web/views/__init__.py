"""The HTTP routes, one flask-smorest blueprint per resource."""
from web.views import anthropic, cluster, generate, health, info, metrics, openai, tokenize

BLUEPRINTS = (generate.blp, openai.blp, openai.public, anthropic.blp, tokenize.blp, tokenize.public, info.blp,
              health.blp, metrics.blp, cluster.blp)
