"""The tokenizer routes: TGI's /tokenize and /chat_tokenize, and vLLM's /tokenize bodies,
/detokenize and /tokenizer_info. /tokenize tells TGI's body (`inputs`) from vLLM's (`prompt` or
`messages`) by its keys and answers each in its own shape, errors included (vLLM's are OpenAI's
error object). `--api-key` guards /tokenize and /detokenize; /chat_tokenize and /tokenizer_info
need none, as in TGI (and vLLM, which guards only /v1)."""
from __future__ import annotations

from flask import jsonify

from common.protocol import FailureReason
from web.auth import require_api_key
from web.errors import GENERATION_ERRORS, GenerationError, ValidationError
from web.json_body import StrictBlueprint
from web.openai.params import chat_plan
from web.openai.schemas import ChatRequestSchema, ChatTokenizeResponseSchema, OpenAIErrorSchema
from web.schemas import ErrorResponseSchema
from web.service import current_service
from web.tokenize import tokenize as tgi_tokenize
from web.tokenizer import TokenizerUnavailable
from web.validation import check_truncate
from web.views.generate import require_json
from web.views.openai import openai_errors
from web.vllm import tokenization as vllm
from web.vllm.schemas import (
    TOKENIZE_BODY_DOC,
    TOKENIZE_RESPONSE_DOC,
    DetokenizeRequestSchema,
    DetokenizeResponseSchema,
    TokenizeBodySchema,
    TokenizerInfoSchema,
    vllm_kind,
)

blp = StrictBlueprint("tokenize", __name__, description="Tokenization: TGI's and vLLM's")
public = StrictBlueprint("tokenize_public", __name__, description="Chat templating and the tokenizer (no API key)")
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


@blp.route("/tokenize", methods=["POST"])
@blp.arguments(TokenizeBodySchema)
@blp.doc(requestBody=TOKENIZE_BODY_DOC, responses=TOKENIZE_RESPONSE_DOC)
@blp.alt_response(400, schema=OpenAIErrorSchema, description="A vLLM body's invalid request (OpenAI's error object)")
@documented_errors(blp, (401, 413, 424))
def tokenize_(body):
    """Tokenize TGI's `inputs`, or vLLM's `prompt` or chat `messages`"""
    service = current_service()
    if vllm_kind(body) is not None:
        return jsonify(_tokens(lambda: vllm.tokenize(body, service.tokens, service.chat_template, service.settings)))
    truncate = check_truncate((body.get("parameters") or {}).get("truncate"), service.settings)
    return jsonify(_tokens(lambda: tgi_tokenize(service.tokens, body["inputs"], truncate=truncate)))


@blp.route("/detokenize", methods=["POST"])
@blp.arguments(DetokenizeRequestSchema, error_status_code=400)
@blp.response(200, DetokenizeResponseSchema, description="The text of the tokens (vLLM's)")
@openai_errors(blp, (401, 413, 503))
def detokenize(body):
    """The text of token ids (vLLM's)"""
    service = current_service()
    return {"prompt": _tokens(lambda: vllm.detokenize(body["tokens"], service.tokens))}


@public.route("/chat_tokenize", methods=["POST"])
@public.arguments(ChatRequestSchema)
@public.response(200, ChatTokenizeResponseSchema, description="The templated text and its tokens")
@documented_errors(public, (413, 424))
def chat_tokenize(body):
    """Template and tokenize a chat request"""
    service = current_service()

    def templated():
        text = chat_plan(body, service.settings, service.chat_template, service.tokens.vocab_size).prompts[0].text
        return {"tokenize_response": tgi_tokenize(service.tokens, text, add_special_tokens=False), "templated_text": text}

    return jsonify(_tokens(templated))


@public.route("/tokenizer_info", methods=["GET"])
@public.response(200, TokenizerInfoSchema, description="The tokenizer's configuration (vLLM's)")
@openai_errors(public, (503,))
def tokenizer_info():
    """The tokenizer's configuration, class and chat template (vLLM's)"""
    return jsonify(_tokens(lambda: vllm.tokenizer_info(current_service().chat_template)))


def _tokens(work):
    try:
        return work()
    except TokenizerUnavailable as error:
        raise GenerationError(f"the tokenizer is not available yet: {error}",
                              reason=FailureReason.TOKENIZER_UNAVAILABLE) from error
