"""The Responses API's routes on the chat route's path: a request becomes a chat body
(`responses_input`), goes through `web.openai.generation.respond` (admission, validation, jobs,
failover, metrics), and the chat answer is written as a response object or its events. With
`store` (the default, as OpenAI's) the response and its conversation are kept for
`previous_response_id`, GET and DELETE, by the key that made it (`responses_store`)."""
from __future__ import annotations

from flask import Response, jsonify

from web import sse
from web.openai.generation import EVENT_STREAM, respond
from web.openai.params import chat_plan
from web.openai.responses_events import ResponseEvents
from web.openai.responses_input import chat_body, conversation
from web.openai.responses_output import ResponseFrame, answer_messages, response
from web.openai.responses_store import ResponseStore, request_owner, response_store
from web.service import current_service


def create_response(body: dict) -> Response:
    store, owner = response_store(), request_owner()
    previous = []
    if body.get("previous_response_id"):
        previous = store.get(owner, body["previous_response_id"])["messages"]
    # Translated inside validation, so that a refused body counts as the chat route's failures do.
    answer = respond("chat", lambda service: chat_plan(chat_body(body, previous), service.settings,
                                                       service.chat_template, service.tokens.vocab_size))
    frame = ResponseFrame.new(body.get("model") or current_service().settings.served_model, body)
    # The conversation so far, without `instructions` (OpenAI does not carry them to the next turn).
    asked = [*previous, *conversation(body["input"])]
    keep = _keeper(store, owner, asked) if body.get("store", True) else (lambda done: None)
    if not body.get("stream"):
        done = response(frame, answer.get_json())
        keep(done)
        return jsonify(done)
    events = ResponseEvents(frame, keep)
    streamed = Response(events.frames(answer.response), content_type=EVENT_STREAM, headers=sse.HEADERS)
    streamed.call_on_close(answer.close)  # the chat stream's session: its slot and its job
    return streamed


def _keeper(store: ResponseStore, owner: str, asked: list[dict]):
    def keep(done: dict) -> None:
        store.put(owner, done, [*asked, *answer_messages(done["output"])])

    return keep


def get_response(response_id: str) -> Response:
    """As stored (jsonify: the documenting schema would drop the fields it does not list)."""
    return jsonify(response_store().get(request_owner(), response_id)["response"])


def delete_response(response_id: str) -> dict:
    response_store().delete(request_owner(), response_id)
    return {"id": response_id, "object": "response", "deleted": True}
