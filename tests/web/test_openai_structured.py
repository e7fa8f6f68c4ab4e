"""`response_format`, `tools` and `tool_choice` on /v1/chat/completions, through the real web app
and Redis with a scripted replica: the grammar each request puts in its job, the 422s, and the
tool-call answers and stream chunks built from what the replica generates (the real model:
tests/integration/test_openai_tools.py)."""
from __future__ import annotations

import json

import pytest

from common.settings import Settings
from tests.web.fake_replica import FakeReplica, reply
from tests.web.test_openai_routes import chat, chat_model_dir, sse_payloads  # noqa: F401
from web.app import create_app

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = ['{"name": "get_', 'weather", "arguments": {"loc', 'ation": "Par', 'is"}}']
NO_TOOL_ANSWER = ['{"name": "no_tool", "arguments": {"content": "It is ', 'sunny \\"', 'here\\u00e9\\n"}}']


@pytest.fixture
def client(chat_model_dir, redis_url, redis_client):  # noqa: F811
    # The tool prompt the word-level template shows makes long prompts (one token per word).
    settings = Settings(model_id=str(chat_model_dir), redis_url=redis_url, max_input_tokens=400, max_total_tokens=500,
                        queue_timeout=3.0, replica_silence_timeout=3.0, keep_alive_interval=0.1)
    return create_app(settings).test_client()


def job_grammar(client, redis_url, **body):
    with FakeReplica(redis_url, reply([" a"])) as replica:
        response = chat(client, **body)
    assert response.status_code == 200, response.get_json()
    grammar = replica.jobs[0].grammar  # as the replica reads it off the queue
    return None if grammar is None else {"type": grammar.kind, "value": grammar.value}


def tool_stream(client, redis_url, words, **body) -> tuple[list[dict], list[str]]:
    with FakeReplica(redis_url, reply(words, finish_reason="eos_token")):
        payloads = sse_payloads(chat(client, stream=True, **body))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p)["choices"][0] for p in payloads[:-1]], payloads


@pytest.mark.parametrize("response_format, grammar", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "json", "value": {"type": "object"}}),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
     {"type": "json", "value": SCHEMA}),
    ({"type": "json", "value": SCHEMA}, {"type": "json", "value": SCHEMA}),  # TGI's
    ({"type": "json_object", "value": SCHEMA}, {"type": "json", "value": SCHEMA}),
    ({"type": "regex", "value": "[ab]+"}, {"type": "regex", "value": "[ab]+"}),
])
def test_response_format_becomes_the_job_grammar(client, redis_url, response_format, grammar):
    assert job_grammar(client, redis_url, response_format=response_format) == grammar


def test_an_invalid_schema_is_the_same_error_as_on_generate(client):
    """The same message; /v1 writes it as OpenAI's 400, /generate as TGI's 422."""
    bad = {"type": "objekt"}
    response = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    generate = client.post("/generate", json={"inputs": "hello", "parameters": {"grammar": {"type": "json",
                                                                                            "value": bad}}})
    assert response.status_code == 400 and generate.status_code == 422
    error = response.get_json()["error"]
    assert error["message"] == generate.get_json()["error"] and error["type"] == "invalid_request_error"
    assert error["message"].startswith("Input validation error: grammar is not valid: ")


def test_tool_choices_become_grammars(client, redis_url):
    def alternatives(grammar):
        schema = grammar["value"]
        return [alt["properties"]["name"]["const"] for alt in schema.get("anyOf", [schema])]

    parameters = WEATHER["function"]["parameters"]
    auto = job_grammar(client, redis_url, tools=[WEATHER, TIME])  # auto is the default
    assert alternatives(auto) == ["get_weather", "get_time", "no_tool"]
    assert auto["value"]["anyOf"][0]["properties"]["arguments"] == parameters
    assert alternatives(job_grammar(client, redis_url, tools=[WEATHER, TIME], tool_choice="required")) == \
        ["get_weather", "get_time"]
    named = job_grammar(client, redis_url, tools=[WEATHER, TIME],
                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert alternatives(named) == ["get_time"]
    assert job_grammar(client, redis_url, tools=[WEATHER], tool_choice="none") is None


def test_function_defs_are_lifted_to_the_root(client, redis_url):
    tool = {"type": "function", "function": {"name": "order", "parameters": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
        "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "integer"}}}}}}}
    grammar = job_grammar(client, redis_url, tools=[tool], tool_choice="required")
    assert grammar["value"]["$defs"] == {"Item": {"type": "object", "properties": {"sku": {"type": "integer"}}}}
    assert "$defs" not in grammar["value"]["properties"]["arguments"]


def test_the_template_sees_the_tools(client):
    """This template does not render `tools`: they go after the last message, with the tool prompt."""
    body = {"messages": [{"role": "user", "content": "hello"}], "tools": [WEATHER]}
    text = client.post("/chat_tokenize", json=body).get_json()["templated_text"]
    assert "hello\n---\nGiven the functions available" in text and '"name": "get_weather"' in text
    custom = client.post("/chat_tokenize", json={**body, "tool_prompt": "Pick one:"}).get_json()["templated_text"]
    assert "\n---\nPick one:\n" in custom
    plain = client.post("/chat_tokenize", json={**body, "tool_choice": "none"}).get_json()["templated_text"]
    assert plain == "user hello a"


@pytest.mark.parametrize("body, fragment", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "`tool_choice` names function 'nope', which is not in `tools`"),
    ({"tools": [WEATHER], "tool_choice": "get_time"}, "'get_time', which is not in `tools`"),  # TGI's bare name
    ({"tool_choice": "required"}, '`tool_choice` is "required" but no `tools` were given'),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "`tool_choice` must be"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "`tools` entries must be"),
    ({"tools": [WEATHER, WEATHER]}, "'get_weather' is used twice or reserved"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "must be a JSON schema"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be used with `tools`"),
    ({"response_format": {"type": "xml"}}, "`response_format` type must be one of"),
    ({"response_format": {"type": "json_schema"}}, "grammar is not valid"),
    ({"response_format": {"type": "regex", "value": "(unclosed"}}, "grammar is not valid"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "grammar is not valid"),
])
def test_bad_structured_requests_are_400(client, body, fragment):
    response = chat(client, **body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_a_tool_call_answer(client, redis_url):
    with FakeReplica(redis_url, reply(CALL, finish_reason="eos_token")):
        body = chat(client, tools=[WEATHER, TIME], tool_choice="required").get_json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"location": "Paris"}'}
    assert body["usage"]["completion_tokens"] == len(CALL)


def test_a_streamed_tool_call_is_fragments_of_the_same_call(client, redis_url):
    chunks, _ = tool_stream(client, redis_url, CALL, tools=[WEATHER], tool_choice="required")
    first = chunks[0]["delta"]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [c["delta"]["tool_calls"][0] for c in chunks[1:-1]]
    assert all(set(f) == {"index", "function"} and f["index"] == 0 for f in fragments)
    assert "".join(f["function"]["arguments"] for f in fragments) == '{"location": "Paris"}'
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]
    assert all("content" not in c["delta"] or c["delta"]["content"] is None for c in chunks)


def test_no_tool_is_a_text_answer_streamed_or_not(client, redis_url):
    with FakeReplica(redis_url, reply(NO_TOOL_ANSWER, finish_reason="eos_token")):
        body = chat(client, tools=[WEATHER]).get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": 'It is sunny "hereé\n'}
    assert body["choices"][0]["finish_reason"] == "stop"
    chunks, _ = tool_stream(client, redis_url, NO_TOOL_ANSWER, tools=[WEATHER])
    assert "".join(c["delta"].get("content") or "" for c in chunks) == 'It is sunny "hereé\n'
    assert not any("tool_calls" in c["delta"] for c in chunks) and chunks[-1]["finish_reason"] == "stop"


def test_a_tool_call_cut_by_max_tokens_finishes_with_length(client, redis_url):
    with FakeReplica(redis_url, reply(CALL[:3], finish_reason="length")):
        body = chat(client, tools=[WEATHER], tool_choice="required", max_tokens=3).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"location": "Par'
    with FakeReplica(redis_url, reply(CALL[:1], finish_reason="length")):  # cut inside the name
        body = chat(client, tools=[WEATHER], tool_choice="required", max_tokens=1).get_json()
    message = body["choices"][0]["message"]
    assert message["content"] is None and body["choices"][0]["finish_reason"] == "length"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    chunks, _ = tool_stream(client, redis_url, CALL[:1], tools=[WEATHER], tool_choice="required", max_tokens=1)
    assert [c["delta"] for c in chunks] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": chunks[0]["delta"]["tool_calls"][0]["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]},
        {}]


def test_each_choice_streams_its_own_call(client, redis_url):
    with FakeReplica(redis_url, reply(CALL, finish_reason="eos_token")):
        payloads = sse_payloads(chat(client, stream=True, tools=[WEATHER], tool_choice="required", n=2, seed=1,
                                     stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2 * len(CALL)
    ids = {}
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        calls = [c["delta"]["tool_calls"][0] for c in mine if "tool_calls" in c["delta"]]
        ids[index] = calls[0]["id"]
        assert "".join(c["function"]["arguments"] for c in calls) == '{"location": "Paris"}'
        assert mine[-1]["finish_reason"] == "tool_calls"
    assert ids[0] != ids[1]
