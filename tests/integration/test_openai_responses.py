"""The official `openai` client's Responses API (`client.responses`), unchanged, against the real
service (web, Redis, a replica serving the tiny model). The oracle is the chat route: a greedy
response is the greedy chat answer to the same conversation, and its `input_tokens` the chat
prompt's, so an item that did not reach the template would show."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

INSTRUCTIONS = "You are terse."
QUESTION = "The capital of France is"
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather now", "parameters": WEATHER,
          "strict": True}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                                "parameters": WEATHER}}]


def openai_client(service, key="-"):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=key, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def client(service):
    return openai_client(service)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs)


def test_greedy_response_is_the_chat_answer(client):
    response = client.responses.create(model="tiny", instructions=INSTRUCTIONS, input=QUESTION, temperature=0,
                                       max_output_tokens=12)
    answer = chat(client, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
                  max_tokens=12)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == answer.choices[0].message.content and response.output_text
    expected = {"length": "incomplete", "stop": "completed"}[answer.choices[0].finish_reason]
    assert response.status == expected and response.output[0].type == "message"
    if expected == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == answer.usage.prompt_tokens
    assert response.usage.output_tokens == answer.usage.completion_tokens
    assert response.usage.input_tokens_details.cached_tokens <= response.usage.input_tokens


def test_stream_events_in_order(client):
    whole = client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=10)
    events = list(client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=10,
                                          stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [k for k in kinds if k == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *deltas, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", f"response.{whole.status}"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.id == events[0].response.id and events[0].response.status == "in_progress"
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_json_schema_streamed_with_the_helper(client):
    text = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    with client.responses.stream(model="tiny", input=QUESTION, max_output_tokens=60, text=text) as stream:
        joined = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and joined == final.output_text
    jsonschema.validate(json.loads(final.output_text), CITY)


def test_json_schema_whole(client):
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=60, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY)


def test_json_object_is_chats(client):
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=30, temperature=0,
                                       text={"format": {"type": "json_object"}})
    same = chat(client, [{"role": "user", "content": QUESTION}], max_tokens=30,
                response_format={"type": "json_object"})
    assert response.output_text == same.choices[0].message.content and response.output_text.startswith("{")


def test_function_call_round_trip(client):
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(model="tiny", input=asked, tools=TOOLS, tool_choice="required", temperature=0,
                                    max_output_tokens=120)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    followed = [*asked, *[item.model_dump(exclude_none=True) for item in first.output],
                {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    second = client.responses.create(model="tiny", input=followed, tools=TOOLS, temperature=0, max_output_tokens=40)
    same = chat(client, [*asked, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}], tools=CHAT_TOOLS, max_tokens=40)
    assert second.usage.input_tokens == same.usage.prompt_tokens
    message = same.choices[0].message
    if message.tool_calls:
        assert [i.arguments for i in second.output if i.type == "function_call"] == \
            [c.function.arguments for c in message.tool_calls]
    else:
        assert second.output_text == message.content


def test_streamed_function_call(client):
    whole = client.responses.create(model="tiny", input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                    temperature=0, max_output_tokens=120)
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", tools=TOOLS,
                                          tool_choice="required", temperature=0, max_output_tokens=120, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (call,) = [i for i in whole.output if i.type == "function_call"]
    assert arguments == call.arguments == events[-3].arguments and events[-2].item.name == "get_weather"


def test_previous_response_continues_the_conversation(client):
    first = client.responses.create(model="tiny", instructions=INSTRUCTIONS, input=QUESTION, temperature=0,
                                    max_output_tokens=6)
    second = client.responses.create(model="tiny", input="And of Spain?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=6)
    same = chat(client, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                         {"role": "user", "content": "And of Spain?"}], max_tokens=6)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == same.usage.prompt_tokens  # instructions are not carried over, as OpenAI's
    assert second.output_text == same.choices[0].message.content


def test_stored_response_get_and_delete(client):
    created = client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=5)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    assert fetched.usage.output_tokens == created.usage.output_tokens
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="more", previous_response_id=created.id, max_output_tokens=5)


def test_streamed_response_is_stored(client):
    events = list(client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=5,
                                          stream=True))
    done = events[-1].response
    fetched = client.responses.retrieve(done.id)
    assert fetched.output_text == done.output_text and fetched.status == done.status
    assert [item.id for item in fetched.output] == [item.id for item in done.output]


def test_unstored_response_is_not_kept(client):
    created = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_a_response_is_its_keys_own(service):
    alice, bob = openai_client(service, "alice-key"), openai_client(service, "bob-key")
    created = alice.responses.create(model="tiny", input=QUESTION, max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="tiny", input="more", previous_response_id=created.id, max_output_tokens=3)
    assert alice.responses.retrieve(created.id).id == created.id


@pytest.mark.parametrize("kwargs, param, words", [
    ({"background": True}, "background", "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input",
     "only text content"),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"text": {"format": {"type": "grammar"}}}, "text", "text.format"),
    ({"input": "hi " * 600}, "input", "maximum context length"),
    ({"input": []}, "input", "`input` cannot be empty"),
])
def test_bad_requests_are_openai_errors(client, kwargs, param, words):
    kwargs = {"model": "tiny", "input": QUESTION, "max_output_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**kwargs)
    assert caught.value.status_code == 400 and words in caught.value.message and caught.value.param == param


def test_openapi_documents_the_routes(service):
    import requests

    paths = requests.get(f"{service.base_url}/api-doc/openapi.json", timeout=30).json()["paths"]
    assert set(paths["/v1/responses"]) == {"post"}
    assert set(paths["/v1/responses/{response_id}"]) - {"parameters"} == {"get", "delete"}
