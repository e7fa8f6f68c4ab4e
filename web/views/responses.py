"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, on the chat
route's path (web.openai.responses_api), under the same API key; errors are OpenAI's."""
from __future__ import annotations

from web.auth import require_api_key
from web.json_body import StrictBlueprint
from web.openai.generation import EVENT_STREAM
from web.openai.responses_api import create_response, delete_response, get_response
from web.openai.responses_schemas import (ResponseDeletedSchema, ResponseEventSchema, ResponseObjectSchema,
                                          ResponseRequestSchema)
from web.openai.schemas import OpenAIErrorSchema
from web.views.generate import require_json
from web.views.openai import openai_arguments, openai_errors

blp = StrictBlueprint("responses", __name__, description="OpenAI's Responses API")
blp.before_request(require_api_key)  # first: 401 before anything about the body
blp.before_request(require_json)


@blp.route("/v1/responses", methods=["POST"])
@openai_arguments(blp, ResponseRequestSchema)
@blp.response(200, ResponseObjectSchema, description="The response (stream=false)")
@blp.alt_response(200, schema=ResponseEventSchema, content_type=EVENT_STREAM,
                  description="The Responses API's server-sent events (stream=true)")
@openai_errors(blp)
def responses(body):
    """A response from the model, through its chat template (OpenAI's Responses API)"""
    return create_response(body)


@blp.route("/v1/responses/<response_id>", methods=["GET"])
@blp.response(200, ResponseObjectSchema, description="A stored response")
@blp.alt_response(404, schema=OpenAIErrorSchema, description="No such response stored by this key")
def stored_response(response_id: str):
    """A stored response, by its id (OpenAI's Responses API)"""
    return get_response(response_id)


@blp.route("/v1/responses/<response_id>", methods=["DELETE"])
@blp.response(200, ResponseDeletedSchema, description="The response was deleted")
@blp.alt_response(404, schema=OpenAIErrorSchema, description="No such response stored by this key")
def delete_stored_response(response_id: str):
    """Delete a stored response (OpenAI's Responses API)"""
    return delete_response(response_id)
