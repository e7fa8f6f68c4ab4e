"""Which served model a request is for, with several models (common/models.py, docs/models.md).

- OpenAI and Anthropic routes (`/v1/...`), TGI's `/chat_tokenize` (a chat body) and vLLM's
  `/tokenize` and `/detokenize` bodies: the body's `model`, a model's name or one of its LoRA
  adapters (`tgi` and an absent `model`: the header's, else the first model);
- every other route (TGI's, `/invocations`, `/info`, TGI's `/tokenize` body): SageMaker's multi-model header
  `X-Amzn-SageMaker-Target-Model: NAME`, absent: the first model.

An unknown name is a 404 naming the served models: `model_not_found` on `/v1`, TGI's error shape
elsewhere. With one model nothing here runs: every request is the model's, as before.
"""
from __future__ import annotations

from flask import request

from common.adapters import BASE_ALIASES
from common.models import ModelCatalog, ServedModel
from web.errors import ApiError
from web.openai.errors import OPENAI_PREFIX, ModelNotFound

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
# Routes off /v1 whose body may name its `model` (a chat body; vLLM's tokenizer bodies): it picks, as on /v1.
BODY_MODEL_ROUTES = ("/chat_tokenize", "/tokenize", "/detokenize")
# The blueprints whose routes run on one model; the others (health, metrics, cluster, /v1/models)
# are about every model.
MODEL_BLUEPRINTS = ("generation", "openai", "responses", "anthropic", "tokenize", "tokenize_public", "info")


class UnknownModel(ApiError):
    status, error_type = 404, "model_not_found"


def requested_model(catalog: ModelCatalog) -> ServedModel:
    header = request.headers.get(TARGET_MODEL_HEADER) or None
    if request.path.startswith(OPENAI_PREFIX) or request.path in BODY_MODEL_ROUTES:
        body = request.get_json(silent=True)
        name = body.get("model") if isinstance(body, dict) else None
        if isinstance(name, str) and name and name not in BASE_ALIASES:
            found = catalog.get(name) or catalog.owner_of_adapter(name)
            if found is None and request.path.startswith(OPENAI_PREFIX):
                raise ModelNotFound(name, served_names(catalog))
            if found is None:
                raise UnknownModel(f"model {name!r} is not served here; the models served here: "
                                   f"{', '.join(served_names(catalog))}")
            return found
    if header is None:
        return catalog.first
    found = catalog.get(header)
    if found is None:
        served = ", ".join(catalog.names)
        if request.path.startswith(OPENAI_PREFIX):
            raise ModelNotFound(header, served_names(catalog))
        raise UnknownModel(f"model {header!r} ({TARGET_MODEL_HEADER}) is not served here; the models served "
                           f"here: {served}")
    return found


def served_names(catalog: ModelCatalog) -> list[str]:
    """Every model's name, each followed by its adapters'."""
    return [name for m in catalog.models for name in (m.name, *m.settings.adapter_names)]
