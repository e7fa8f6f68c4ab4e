"""Anthropic's Messages API: /v1/messages and /v1/messages/count_tokens, on the chat route's path
(web.anthropic). The same API key as every generation route, sent as `x-api-key` (Anthropic's
header) or `Authorization: Bearer`; `anthropic-version` is accepted and not read. Errors are
Anthropic's (web.anthropic.errors)."""
from __future__ import annotations

from web.anthropic.generation import count_tokens, create_message
from web.anthropic.schemas import (
    ANTHROPIC_ERRORS,
    AnthropicErrorSchema,
    CountTokensRequestSchema,
    CountTokensSchema,
    MessageEventSchema,
    AnthropicMessageSchema,
    MessagesRequestSchema,
)
from web.auth import require_api_key
from web.json_body import StrictBlueprint
from web.openai.generation import EVENT_STREAM
from web.views.generate import require_json

blp = StrictBlueprint("anthropic", __name__, description="Anthropic-compatible Messages API")
blp.before_request(require_api_key)  # first: 401 before anything about the body
blp.before_request(require_json)


def anthropic_errors(func):
    func = blp.alt_response(400, schema=AnthropicErrorSchema, description="Invalid request")(func)
    for status, description in ANTHROPIC_ERRORS.items():
        func = blp.alt_response(status, schema=AnthropicErrorSchema, description=description)(func)
    return func


@blp.route("/v1/messages", methods=["POST"])
@blp.arguments(MessagesRequestSchema, error_status_code=400)
@blp.response(200, AnthropicMessageSchema, description="The message (stream=false)")
@blp.alt_response(200, schema=MessageEventSchema, content_type=EVENT_STREAM,
                  description="Anthropic's server-sent events (stream=true), ending with message_stop")
@anthropic_errors
def messages(body):
    """A message from the model, through its chat template (Anthropic's API)"""
    return create_message(body)


@blp.route("/v1/messages/count_tokens", methods=["POST"])
@blp.arguments(CountTokensRequestSchema, error_status_code=400)
@blp.response(200, CountTokensSchema, description="The prompt's tokens, tools and template included")
@anthropic_errors
def messages_count_tokens(body):
    """Count a Messages request's input tokens (Anthropic's API)"""
    return count_tokens(body)
