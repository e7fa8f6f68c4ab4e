"""The per-app objects the views work with, kept in `app.extensions` (no module globals)."""
from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flask import current_app, g, has_request_context, request

from common.protocol import FailureReason, Job
from common.settings import Settings
from common.tenants import Tenants
from tasks.client.generation_client import EventStream, NoReplica, QueueUnavailable
from web.admission import Admission
from web.chat_template import ChatTemplate
from web.cluster import ClusterView
from web.cold_start import ColdStarter
from web.errors import GenerationError
from web.metrics import Metrics
from web.model_routing import MODEL_BLUEPRINTS, requested_model
from web.rate_limits import TenantLimits
from web.tenancy import cache_namespace, current_tenant, isolation
from web.tokenizer import TokenCounter, TokenizerUnavailable
from web.validation import ValidRequest, validate_request

EXTENSION = "blitzscale"


@dataclass
class Service:
    settings: Settings
    client: object  # tasks.client.generation_client.GenerationClient, or a test double with the same methods
    tokens: TokenCounter
    admission: Admission
    cluster: ClusterView
    metrics: Metrics
    chat_template: ChatTemplate
    tenants: Tenants | None = None  # None: no key configured, every route open (web/tenancy.py)
    limits: TenantLimits = field(default_factory=lambda: TenantLimits(None, 0.0))  # per tenant, in Redis
    # With several models or --min-replicas 0: gets a replica of a model that has none on its way
    # (web.cold_start.ColdStarter); raises NoReplica when nothing can be freed.
    cold_start: ColdStarter | None = None
    models: dict[str, "Service"] = field(default_factory=dict)  # name -> this service for that model

    def for_model(self, name: str) -> "Service":
        """This service with the settings, tokenizer and chat template of model `name`."""
        return self.models.get(name, self)

    def validate(self, body: dict, *, stream: bool, full_text_default: bool, add_special_tokens: bool = True,
                 cap_new_tokens: bool = False, input_ids: Sequence[int] | None = None,
                 samples: int = 1) -> ValidRequest:
        """`add_special_tokens=False` for a chat template's text (it holds them already);
        `input_ids`: a prompt sent as token ids (not encoded again); `samples`: the jobs that will
        generate from this prompt (OpenAI's `n`/`best_of`), each charged to tokens per minute."""
        try:
            valid = validate_request(
                body, settings=self.settings, stream=stream, full_text_default=full_text_default,
                encode=functools.partial(self.tokens.encode, add_special_tokens=add_special_tokens),
                cap_new_tokens=cap_new_tokens, input_ids=input_ids,
            )
        except TokenizerUnavailable as error:
            raise GenerationError(f"the tokenizer is not available yet: {error}",
                                  reason=FailureReason.TOKENIZER_UNAVAILABLE) from error
        self.limits.charge_tokens(current_tenant(), valid.input_length + valid.parameters["max_new_tokens"] *
                                  valid.parameters["best_of"] * samples)
        valid.job.cache_salt = cache_namespace(isolation(self.settings, self.tenants), current_tenant(),
                                               valid.parameters["cache_salt"])
        if self.settings.catalog.several:
            valid.job.model = self.settings.served_model
        return valid

    def submit(self, job: Job) -> EventStream:
        try:
            model, arrived = job.model or self.settings.served_model, time.monotonic()
            started = self.cold_start is not None and self.cold_start(model)
            stream = self.client.submit(job)
            return self.cold_start.timed(stream, model, arrived) if started else stream
        except QueueUnavailable as error:
            raise GenerationError(f"the queue is unavailable: {error}", reason=FailureReason.QUEUE_UNAVAILABLE) from error
        except NoReplica as error:
            raise GenerationError(str(error), reason=FailureReason.NO_REPLICA) from error


def current_service() -> Service:
    """The app's service; on a route about one model, with several models, that model's
    (web/model_routing.py: 404 for an unknown one)."""
    service = current_app.extensions[EXTENSION]
    if not service.models or not has_request_context() or request.blueprint not in MODEL_BLUEPRINTS:
        return service
    if "blitz_model" not in g:
        g.blitz_model = requested_model(service.settings.catalog).name
    return service.for_model(g.blitz_model)
