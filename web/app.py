"""The Flask application factory."""
from __future__ import annotations

import dataclasses
import functools

from flask import Flask, g, request

from common.settings import Settings
from tasks.client.generation_client import GenerationClient
from web import request_id, tenant_metrics
from web.admission import make_admission
from web.anthropic.errors import MESSAGES_PREFIX
from web.anthropic.errors import write_error as write_anthropic_error
from web.chat_template import ChatTemplate
from web.cluster import ClusterView
from web.cold_start import ColdStarter
from web.errors import register_error_handlers
from web.metrics import Metrics
from web.openai.errors import OPENAI_PREFIX, write_error
from web.openapi import CONFIG as OPENAPI_CONFIG
from web.openapi import make_api, swagger_ui_assets
from web.service import EXTENSION, Service
from web.rate_limits import TenantLimits, redis_connection
from web.tenancy import load_tenants
from web.tokenizer import TokenCounter
from web.views import BLUEPRINTS
from web.vllm.tokenization import write_tokenize_error

MAX_CONTENT_LENGTH = 2_000_000  # TGI's default --payload-limit (bytes)
GENERATION_BLUEPRINTS = ("generation", "openai", "responses", "anthropic")  # the routes tgi_request_* count
# ... except those that generate nothing (their successes are not counted either): a stored
# response read or deleted, a token count.
NOT_GENERATION = ("responses.stored_response", "responses.delete_stored_response",
                  "anthropic.messages_count_tokens")


def create_app(settings: Settings | None = None, client=None, *, tokenizer=None) -> Flask:
    """`client`: a `tasks.client.generation_client.GenerationClient` (made from settings when None).
    `tokenizer`: a `tokenizers.Tokenizer`; loaded from the model files on first use when None."""
    settings = settings or Settings.from_env()
    if client is None:
        client = GenerationClient(settings)

    app = Flask(__name__)
    app.config.update(OPENAPI_CONFIG, MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH)
    app.json.sort_keys = False  # TGI's field order
    app.json.ensure_ascii = False
    request_id.init_app(app)  # first: every other hook and view logs with the request id

    service = app.extensions[EXTENSION] = Service(
        settings=settings,
        client=client,
        tokens=TokenCounter(settings, tokenizer),
        admission=make_admission(settings, client),
        cluster=ClusterView(client, settings=settings),
        metrics=Metrics(app, settings, client),
        chat_template=ChatTemplate(settings),
        tenants=load_tenants(settings),
        limits=TenantLimits(redis_connection(client), lease_s=settings.request_timeout + 60),
    )
    if settings.cold_starts and hasattr(client, "celery"):  # a test's client double starts nothing
        service.cold_start = ColdStarter(client, settings, service.metrics.registry)
    if settings.catalog.several:  # each model's own settings, tokenizer and chat template (web/model_routing.py)
        for model in settings.catalog.models:
            own = model.settings
            service.models[model.name] = dataclasses.replace(
                service, settings=own, tokens=TokenCounter(own, tokenizer if model.index == 0 else None),
                chat_template=ChatTemplate(own), cluster=ClusterView(client, settings=settings, model=model.name),
                metrics=service.metrics.for_model(model.name))
    tenant_metrics.init_app(app, app.extensions[EXTENSION].metrics.registry)
    api = make_api()
    api.init_app(app)
    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    app.register_blueprint(swagger_ui_assets())
    # After init_app: replaces flask-smorest's error handler. The /v1 routes answer OpenAI's errors,
    # vLLM's tokenizer routes vLLM's (OpenAI's object), /tokenize each body's own shape; /v1/messages
    # (first: the first prefix that matches writes) Anthropic's.
    register_error_handlers(app, {MESSAGES_PREFIX: write_anthropic_error, OPENAI_PREFIX: write_error,
                                  "/tokenize": write_tokenize_error, "/detokenize": write_error,
                                  "/tokenizer_info": write_error},
                            on_error=functools.partial(_count_generation_failure, app.extensions[EXTENSION]))
    return app


def _count_generation_failure(service: Service, error) -> None:
    """Errors of generation routes that no view counted (auth, schemas, body size, content type)."""
    if request.blueprint in GENERATION_BLUEPRINTS and request.endpoint not in NOT_GENERATION:
        # under the request's model when it was resolved (an unknown one counts under the first)
        service.for_model(g.get("blitz_model", "")).metrics.tgi.refused_at_the_edge(error)
