"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models and
/v1/models/{id}. Generation shares TGI's path (web.openai.generation); `--api-key` guards every
route but the models, as in TGI. Errors are OpenAI's (web.openai.errors). The tokenizer routes
(TGI's and vLLM's): web.views.tokenize."""
from __future__ import annotations

from flask import jsonify

from web.auth import require_api_key
from web.json_body import StrictBlueprint
from web.openai.generation import EVENT_STREAM, respond
from web.openai.models import find_model, model_objects
from web.openai.params import chat_plan, completion_plan
from web.openai.schemas import (
    OPENAI_ERRORS,
    ChatCompletionChunkSchema,
    ChatCompletionSchema,
    ChatRequestSchema,
    CompletionRequestSchema,
    CompletionSchema,
    ModelListSchema,
    ModelSchema,
    OpenAIErrorSchema,
)
from web.service import current_service
from web.views.generate import require_json

blp = StrictBlueprint("openai", __name__, description="OpenAI-compatible chat and completions")
public = StrictBlueprint("openai_public", __name__, description="Served models (no API key)")
blp.before_request(require_api_key)  # first: 401 before anything about the body
for blueprint in (blp, public):
    blueprint.before_request(require_json)


def openai_errors(blueprint: StrictBlueprint, statuses=tuple(s for s in OPENAI_ERRORS if s != 404)):
    """OpenAI's error object, with its statuses (400 is documented by `arguments`)."""
    def decorate(func):
        for status in statuses:
            func = blueprint.alt_response(status, schema=OpenAIErrorSchema, description=OPENAI_ERRORS[status])(func)
        return func

    return decorate


def streamed(schema):
    return blp.alt_response(200, schema=schema, content_type=EVENT_STREAM,
                            description="Server-sent events (stream=true), ending with `data: [DONE]`")


def openai_arguments(blueprint: StrictBlueprint, schema):
    """The body, its type errors a 400 (OpenAI's status), documented with OpenAI's error object."""
    def decorate(func):
        func = blueprint.arguments(schema, error_status_code=400)(func)
        return blueprint.alt_response(400, schema=OpenAIErrorSchema, description="Invalid request")(func)

    return decorate


@blp.route("/v1/chat/completions", methods=["POST"])
@openai_arguments(blp, ChatRequestSchema)
@blp.response(200, ChatCompletionSchema, description="The answer (stream=false)")
@streamed(ChatCompletionChunkSchema)
@openai_errors(blp)
def chat_completions(body):
    """Chat through the model's chat template (OpenAI's API)"""
    return respond("chat", lambda service: chat_plan(body, service.settings, service.chat_template,
                                                     service.tokens.vocab_size))


@blp.route("/v1/completions", methods=["POST"])
@openai_arguments(blp, CompletionRequestSchema)
@blp.response(200, CompletionSchema, description="The completions (stream=false)")
@streamed(CompletionSchema)
@openai_errors(blp)
def completions(body):
    """Complete raw prompts, no template (OpenAI's API)"""
    return respond("completion", lambda service: completion_plan(body, service.settings, service.tokens))


@public.route("/v1/models", methods=["GET"])
@public.response(200, ModelListSchema, description="The base model, then each LoRA adapter (parent: the base)")
def models():
    """The served models (OpenAI's API)"""
    return {"object": "list", "data": model_objects(current_service().settings)}


@public.route("/v1/models/<path:model>", methods=["GET"])
@public.response(200, ModelSchema, description="The served model")
@openai_errors(public, (404,))
def model(model: str):
    """One model, by its id: the served model name or a LoRA adapter's (OpenAI's API)"""
    return find_model(model, current_service().settings)

