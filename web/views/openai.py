"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions and /v1/models, and TGI's
/tokenize and /chat_tokenize. Generation shares TGI's path (web.openai.generation); `--api-key`
guards every route but /v1/models and /chat_tokenize, as in TGI."""
from __future__ import annotations

from flask import jsonify

from common.protocol import FailureReason
from web.auth import require_api_key
from web.errors import GENERATION_ERRORS, GenerationError, ValidationError
from web.json_body import StrictBlueprint
from web.openai.generation import respond
from web.openai.params import chat_plan, completion_plan
from web.openai.schemas import (
    ChatCompletionChunkSchema,
    ChatCompletionSchema,
    ChatRequestSchema,
    ChatTokenizeResponseSchema,
    CompletionRequestSchema,
    CompletionSchema,
    ModelListSchema,
    SimpleTokenSchema,
    TokenizeRequestSchema,
)
from web.schemas import ErrorResponseSchema
from web.service import current_service
from web.sse import MIMETYPE as EVENT_STREAM
from web.tokenize import tokenize
from web.tokenizer import TokenizerUnavailable
from web.validation import check_truncate
from web.views.generate import require_json

blp = StrictBlueprint("openai", __name__, description="OpenAI-compatible chat and completions, and tokenization")
public = StrictBlueprint("openai_public", __name__, description="Served models and chat templating (no API key)")
blp.before_request(require_api_key)  # first: 401 before anything about the body
for blueprint in (blp, public):
    blueprint.before_request(require_json)


def documented_errors(blueprint: StrictBlueprint, statuses=tuple(GENERATION_ERRORS)):
    def decorate(func):
        for status in statuses:
            if status != ValidationError.status:
                func = blueprint.alt_response(status, schema=ErrorResponseSchema,
                                              description=GENERATION_ERRORS[status])(func)
        return func

    return decorate


def streamed(schema):
    return blp.alt_response(200, schema=schema, content_type=EVENT_STREAM,
                            description="Server-sent events (stream=true), ending with `data: [DONE]`")


@blp.route("/v1/chat/completions", methods=["POST"])
@blp.arguments(ChatRequestSchema)
@blp.response(200, ChatCompletionSchema, description="The answer (stream=false)")
@streamed(ChatCompletionChunkSchema)
@documented_errors(blp)
def chat_completions(body):
    """Chat through the model's chat template (OpenAI's API)"""
    return respond("chat", lambda service: chat_plan(body, service.settings, service.chat_template,
                                                     service.tokens.vocab_size))


@blp.route("/v1/completions", methods=["POST"])
@blp.arguments(CompletionRequestSchema)
@blp.response(200, CompletionSchema, description="The completions (stream=false)")
@streamed(CompletionSchema)
@documented_errors(blp)
def completions(body):
    """Complete raw prompts, no template (OpenAI's API)"""
    return respond("completion", lambda service: completion_plan(body, service.settings, service.tokens.vocab_size))


@blp.route("/tokenize", methods=["POST"])
@blp.arguments(TokenizeRequestSchema)
@blp.response(200, SimpleTokenSchema(many=True), description="The tokens of `inputs`")
@documented_errors(blp, (401, 413, 424))
def tokenize_(body):
    """Tokenize inputs"""
    service = current_service()
    truncate = check_truncate((body.get("parameters") or {}).get("truncate"), service.settings)
    return jsonify(_tokens(lambda: tokenize(service.tokens, body["inputs"], truncate=truncate)))


@public.route("/chat_tokenize", methods=["POST"])
@public.arguments(ChatRequestSchema)
@public.response(200, ChatTokenizeResponseSchema, description="The templated text and its tokens")
@documented_errors(public, (413, 424))
def chat_tokenize(body):
    """Template and tokenize a chat request"""
    service = current_service()

    def templated():
        text = chat_plan(body, service.settings, service.chat_template, service.tokens.vocab_size).prompts[0]
        return {"tokenize_response": tokenize(service.tokens, text, add_special_tokens=False), "templated_text": text}

    return jsonify(_tokens(templated))


@public.route("/v1/models", methods=["GET"])
@public.response(200, ModelListSchema, description="The one model this service serves")
def models():
    """The served model (OpenAI's API)"""
    s = current_service().settings
    return {"object": "list",
            "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": s.model_id,
                      "max_model_len": s.max_total_tokens}]}


def _tokens(work):
    try:
        return work()
    except TokenizerUnavailable as error:
        raise GenerationError(f"the tokenizer is not available yet: {error}",
                              reason=FailureReason.TOKENIZER_UNAVAILABLE) from error
