"""One Messages request: its chat body through the chat route's path (`web.openai.generation.respond`:
admission, validation, jobs, failover, metrics), and the chat answer written as Anthropic's
message or events. `top_k` and the stop-sequence cut are the only changes to the chat plan."""
from __future__ import annotations

import dataclasses

from flask import Response, jsonify

from common.protocol import FailureReason
from web import sse
from web.anthropic.chat_request import chat_body
from web.anthropic.events import EventWriter
from web.anthropic.message import message, new_message_id
from web.errors import GenerationError
from web.openai.generation import EVENT_STREAM, respond
from web.openai.params import GenerationPlan, chat_plan
from web.service import Service, current_service
from web.tokenizer import TokenizerUnavailable


def create_message(body: dict) -> Response:
    stops = list(body.get("stop_sequences") or [])
    # Translated inside validation, so that a refused body counts as the chat route's failures do.
    answer = respond("chat", lambda service: messages_plan(chat_body(body), body.get("top_k"), service))
    if not body.get("stream"):
        reply = answer.get_json()
        return jsonify(message(reply, stops, reply["model"]))
    model = body.get("model") or current_service().settings.served_model
    writer = EventWriter(new_message_id(), model, int(answer.headers.get("x-prompt-tokens", 0)), stops)
    response = Response(writer.frames(answer.response), content_type=EVENT_STREAM, headers=sse.HEADERS)
    response.call_on_close(answer.close)  # the chat stream's session: its slot and its job
    return response


def messages_plan(chat: dict, top_k: int | None, service: Service) -> GenerationPlan:
    plan = messages_chat_plan(chat, service)
    if top_k is not None:
        plan.parameters["top_k"] = top_k
    return plan


def messages_chat_plan(chat: dict, service: Service) -> GenerationPlan:
    """The chat plan, its stop sequences left in the text (for `web.anthropic.stop` to cut)."""
    plan = chat_plan(chat, service.settings, service.chat_template, service.tokens.vocab_size)
    return dataclasses.replace(plan, options=dataclasses.replace(plan.options, stops=()))


def count_tokens(body: dict) -> dict:
    """The prompt's tokens as a Messages request with this body would have them (template, tools)."""
    service = current_service()
    chat = chat_body({**body, "max_tokens": 1})
    try:
        text = messages_chat_plan(chat, service).prompts[0].text
        return {"input_tokens": len(service.tokens.encode(text, add_special_tokens=False))}
    except TokenizerUnavailable as error:
        raise GenerationError(f"the tokenizer is not available yet: {error}",
                              reason=FailureReason.TOKENIZER_UNAVAILABLE) from error
