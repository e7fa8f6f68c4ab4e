"""The HTTP routes, one flask-smorest blueprint per resource."""
from web.views import anthropic, cluster, generate, health, info, metrics, openai, responses, tokenize

BLUEPRINTS = (generate.blp, openai.blp, openai.public, responses.blp, anthropic.blp, tokenize.blp, tokenize.public,
              info.blp, health.blp, metrics.blp, cluster.blp)
