"""The served models as OpenAI's model objects (`GET /v1/models`, `GET /v1/models/{id}`): the base
model, whose id is the served name (`--served-model-name`, never a local path), then each LoRA
adapter of `--lora-adapters`, as vLLM lists them: a model whose `parent` is the base. `created` is
the time the model's files were prepared (the tokenizer file written beside the converted
weights, or the model directory's). A request's `model` picks the adapter (`adapter_for`)."""
from __future__ import annotations

import time

from common.adapters import BASE_ALIASES
from common.settings import Settings
from web.openai.errors import ModelNotFound
from web.tokenizer import tokenizer_file

OWNED_BY = "blitzscale"  # the service that serves it, as vLLM answers "vllm"
_STARTED = int(time.time())  # `created` while the files are not prepared yet


def model_object(settings: Settings, adapter: str | None = None) -> dict:
    """The base model's object, or an adapter's (`parent`: the base model)."""
    model = {"id": adapter or settings.served_model, "object": "model", "created": prepared_at(settings),
             "owned_by": OWNED_BY, "max_model_len": settings.max_total_tokens}
    return {**model, "parent": settings.served_model} if adapter else model


def model_objects(settings: Settings) -> list[dict]:
    """Every served model (with several: each, replicas or not), each followed by its adapters."""
    return [obj for own in (m.settings for m in settings.catalog.models)
            for obj in [model_object(own)] + [model_object(own, name) for name in own.adapter_names]]


def find_model(model: str, settings: Settings) -> dict:
    found = next((obj for obj in model_objects(settings) if obj["id"] == model), None)
    if found is None:
        raise ModelNotFound(model)
    return found


def adapter_for(model: str | None, settings: Settings) -> str | None:
    """The LoRA adapter a request's `model` names; None for the base model (its name, `tgi`, or
    absent). Without adapters any name means the base model (it is echoed back, as before); with
    them an unknown name is refused, naming the served models."""
    names = settings.adapter_names
    if model in names:
        return model
    if not names or model in (None, "", settings.served_model, *BASE_ALIASES):
        return None
    raise ModelNotFound(model, [settings.served_model, *names])


def prepared_at(settings: Settings) -> int:
    try:
        return int(tokenizer_file(settings).stat().st_mtime)
    except OSError:  # a replica is still preparing the model
        return _STARTED
