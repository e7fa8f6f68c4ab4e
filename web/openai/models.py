"""The served model as OpenAI's model object (`GET /v1/models`, `GET /v1/models/{id}`): its id is
the served name (`--served-model-name`, never a local path), `created` the time its files were
prepared (the tokenizer file written beside the converted weights, or the model directory's)."""
from __future__ import annotations

import time

from common.settings import Settings
from web.tokenizer import tokenizer_file

OWNED_BY = "blitzscale"  # the service that serves it, as vLLM answers "vllm"
_STARTED = int(time.time())  # `created` while the files are not prepared yet


def model_object(settings: Settings) -> dict:
    return {"id": settings.served_model, "object": "model", "created": prepared_at(settings), "owned_by": OWNED_BY,
            "max_model_len": settings.max_total_tokens}


def prepared_at(settings: Settings) -> int:
    try:
        return int(tokenizer_file(settings).stat().st_mtime)
    except OSError:  # a replica is still preparing the model
        return _STARTED
