"""The official `anthropic` client, unchanged, against the real service (web, Redis, a replica
serving the tiny model): /v1/messages whole and streamed, stop sequences, a tool-use round trip,
count_tokens, and errors as the SDK's own exceptions. The oracle for text is the chat route: a
greedy message is the greedy chat answer to the same conversation."""
from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "The capital of France is"}]
WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
# This SDK sends no sampling fields of its own (Anthropic's newer models take none): they go as extra body.
GREEDY = {"extra_body": {"temperature": 0}}
TOOLS = [{"name": "get_weather", "description": "The weather now", "input_schema": WEATHER}]


@pytest.fixture(scope="module")
def client(service):
    return anthropic.Anthropic(base_url=service.base_url, api_key="-", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def chat_client(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


def create(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 12)
    return client.messages.create(model="tiny", **kwargs)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_greedy_message_is_the_chat_answer(client, chat_client):
    message = create(client, system=SYSTEM, **GREEDY)
    chat = chat_client.chat.completions.create(model="tiny", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": SYSTEM}, *MESSAGES])
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert text_of(message) == chat.choices[0].message.content and text_of(message)
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens


def test_stream_joins_to_the_message(client):
    message = create(client, **GREEDY)
    with client.messages.stream(model="tiny", max_tokens=12, messages=MESSAGES, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(message) == text_of(final)
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_stream_events_in_anthropic_order(client):
    with client.messages.stream(model="tiny", max_tokens=8, messages=MESSAGES, **GREEDY) as stream:
        kinds = [event.type for event in stream if event.type != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    body = [k for k in kinds[1:-2] if k in ("content_block_start", "content_block_delta", "content_block_stop")]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert body.count("content_block_start") == body.count("content_block_stop") == 1


@pytest.mark.parametrize("streamed", [False, True])
def test_stop_sequence_cuts_and_is_named(client, streamed):
    full = text_of(create(client, **GREEDY, max_tokens=16))
    stop = full[len(full) // 2:len(full) // 2 + 2]  # two characters from the middle of the greedy text
    assert stop.strip(), full
    kwargs = {"model": "tiny", "max_tokens": 16, "messages": MESSAGES, **GREEDY, "stop_sequences": [stop, "never"]}
    if streamed:
        with client.messages.stream(**kwargs) as stream:
            text = "".join(stream.text_stream)
            message = stream.get_final_message()
    else:
        message = client.messages.create(**kwargs)
        text = text_of(message)
    assert text == full[:full.index(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_top_k_one_is_greedy(client):
    sampled = create(client, max_tokens=10, extra_body={"temperature": 1.0, "top_k": 1})  # one token to draw from
    assert text_of(sampled) == text_of(create(client, max_tokens=10, **GREEDY))


def test_max_tokens_reached(client):
    message = create(client, **GREEDY, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def tool_turn(client, **kwargs):
    return create(client, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=120,
                  messages=[{"role": "user", "content": "Weather in Paris?"}], **kwargs)


def test_tool_use_round_trip(client):
    message = tool_turn(client, **GREEDY)
    assert message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]}]

    def result(text):
        return [*history, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": text}]}]

    answer = client.messages.create(model="tiny", max_tokens=120, tools=TOOLS, messages=result("Sunny, 21 C"),
                                    **GREEDY)
    assert answer.stop_reason in ("end_turn", "tool_use", "max_tokens") and answer.content
    # The model reads the result: a longer result is a longer prompt, by its own tokens.
    short = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=result("Sunny")).input_tokens
    longer = client.messages.count_tokens(model="tiny", tools=TOOLS, messages=result("Sunny, 21 C")).input_tokens
    assert longer > short and answer.usage.input_tokens + answer.usage.cache_read_input_tokens == longer


def test_streamed_tool_use_is_the_message(client):
    message = tool_turn(client, **GREEDY)
    with client.messages.stream(model="tiny", max_tokens=120, tools=TOOLS, **GREEDY,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        partial = "".join(event.delta.partial_json for event in stream
                          if event.type == "content_block_delta" and event.delta.type == "input_json_delta")
        final = stream.get_final_message()
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and json.loads(partial) == call.input
    assert call.input == [b for b in message.content if b.type == "tool_use"][0].input


def test_count_tokens_is_the_prompt(client):
    counted = client.messages.count_tokens(model="tiny", system=SYSTEM, messages=MESSAGES).input_tokens
    message = create(client, system=SYSTEM, **GREEDY, max_tokens=2)
    assert counted == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert client.messages.count_tokens(model="tiny", messages=MESSAGES).input_tokens < counted


@pytest.mark.parametrize("kwargs, words", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, "image"),
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, "prompt is too long"),
    ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": TOOLS}, "nope"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
])
def test_bad_requests_are_anthropic_errors(client, kwargs, words):
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert words in caught.value.body["error"]["message"]


def test_openapi_documents_the_routes(service):
    import requests

    paths = requests.get(f"{service.base_url}/api-doc/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= set(paths)


def test_output_format_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
    message = create(client, max_tokens=60, output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), schema)
