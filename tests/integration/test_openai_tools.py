"""Structured output through the official `openai` client against the real service (web, Redis,
a replica serving the tiny model): `response_format` (JSON schema, regex) and tool calls, whole
and streamed. The tiny model's ChatML template renders tools, tool calls and tool results."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests

MESSAGES = [{"role": "user", "content": "What is the weather like in Paris?"}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "kind": {"enum": ["town", "city", "village"]},
    },
    "required": ["city", "population", "kind"],
    "additionalProperties": False,
}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]{2,6}/[A-Z][a-z]{2,6}$"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [  # short: the tiny model's tokenizer spends ~1 token per character on JSON
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
PHONE = r"\+33 [1-9]( [0-9]{2}){4}"


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


def chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model="tiny", **kwargs)


def assert_valid_call(call, name=None):
    assert call.id.startswith("call_") and call.type == "function"
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed_call(chunks) -> tuple[str, str, str, str]:
    """(id, name, arguments joined, finish_reason) of a streamed tool call."""
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].id and calls[0].function.name and calls[0].function.arguments == ""
    assert all(c.index == 0 for c in calls) and all(c.id is None for c in calls[1:])
    return (calls[0].id, calls[0].function.name, "".join(c.function.arguments or "" for c in calls),
            chunks[-1].choices[0].finish_reason)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"top_p": 0.9, "seed": 8}])
def test_json_schema_output_validates(client, sampling):
    answer = chat(client, response_format={"type": "json_schema",
                                           "json_schema": {"name": "city", "schema": CITY, "strict": True}},
                  **sampling)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), CITY)


def test_json_object_mode_gives_an_object(client):
    answer = chat(client, response_format={"type": "json_object"}, temperature=0, max_tokens=400)
    if answer.choices[0].finish_reason == "stop":  # a random model may nest past max_tokens
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:
        assert answer.choices[0].message.content.startswith("{")


def test_regex_response_format_full_matches(client):
    answer = chat(client, extra_body={"response_format": {"type": "regex", "value": PHONE}}, temperature=0)
    assert re.fullmatch(PHONE, answer.choices[0].message.content)
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_required_tool_call_validates_and_streams_the_same(client, sampling):
    answer = chat(client, tools=TOOLS, tool_choice="required", **sampling)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_valid_call(call)
    chunks = list(chat(client, tools=TOOLS, tool_choice="required", stream=True, **sampling))
    call_id, name, arguments, finish = streamed_call(chunks)
    assert (name, arguments, finish) == (call.function.name, call.function.arguments, "tool_calls")
    assert call_id.startswith("call_") and len({c.id for c in chunks}) == 1


def test_the_clients_stream_helper_assembles_the_same_call(client):
    """openai's own accumulator (`chat.completions.stream`) joins our chunks into the call."""
    answer = chat(client, tools=TOOLS, tool_choice="required", temperature=0)
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=200) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    expected = answer.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (expected.function.name, expected.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_calls_that_function(client):
    for name in ("get_time", "get_weather"):
        answer = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}},
                      temperature=1.0, seed=5)
        assert answer.choices[0].finish_reason == "tool_calls"
        assert_valid_call(answer.choices[0].message.tool_calls[0], name)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_gives_a_valid_call_or_a_text_answer(client, seed):
    answer = chat(client, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=400)
    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_call(choice.message.tool_calls[0])
    else:  # no_tool: the text alone, never the wrapper JSON
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert not choice.message.content.startswith('{"name"')
    chunks = list(chat(client, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=400, stream=True))
    if choice.message.tool_calls:
        assert streamed_call(chunks)[1:] == (choice.message.tool_calls[0].function.name,
                                             choice.message.tool_calls[0].function.arguments, "tool_calls")
    else:
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_auto_steered_to_no_tool_answers_in_text_streamed_or_not(client, service):
    """The tiny model prefers a function; a logit bias on "n" makes it pick `no_tool`."""
    [n] = requests.post(f"{service.base_url}/tokenize", json={"inputs": "n"}, timeout=30).json()
    kwargs = {"tools": TOOLS, "temperature": 0, "max_tokens": 120, "logit_bias": {str(n["id"]): 10}}
    choice = chat(client, **kwargs).choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert not choice.message.content.startswith("{") and '"arguments"' not in choice.message.content
    chunks = list(chat(client, stream=True, **kwargs))
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_tool_choice_none_is_plain_text(client):
    answer = chat(client, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [12, 22, 40])  # cut in the name, in the wrapper, in the arguments
def test_a_call_cut_by_max_tokens_is_a_partial_call_never_the_wrapper(client, max_tokens):
    whole = chat(client, tools=TOOLS, tool_choice="required", temperature=0).choices[0].message.tool_calls[0]
    answer = chat(client, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=max_tokens)
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert whole.function.name.startswith(call.function.name) and call.function.name
    assert whole.function.arguments.startswith(call.function.arguments)
    chunks = list(chat(client, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=max_tokens,
                       stream=True))
    _, name, arguments, finish = streamed_call(chunks)
    assert (name, arguments, finish) == (call.function.name, call.function.arguments, "length")
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_a_conversation_with_calls_and_results_renders_and_continues(client, service):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    templated = requests.post(f"{service.base_url}/chat_tokenize", json={"messages": history, "tools": TOOLS},
                              timeout=30).json()["templated_text"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}' in templated
    assert "<|im_start|>tool\n22 degrees and sunny<|im_end|>" in templated
    assert '"name": "get_time"' in templated.split("<|im_start|>user")[0]  # the tools, in the system message
    answer = chat(client, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=4)
    assert answer.choices[0].message.content is not None


def test_bad_requests_are_400(client):
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}
    unknown = {"type": "function", "function": {"name": "get_stock"}}
    for kwargs, fragment, param in (
            ({"response_format": bad_schema}, "Input validation error: grammar is not valid: ", "response_format"),
            ({"tools": TOOLS, "tool_choice": unknown}, "'get_stock', which is not in `tools`", "tool_choice")):
        with pytest.raises(openai.BadRequestError) as raised:
            chat(client, **kwargs)
        assert fragment in str(raised.value) and raised.value.type == "invalid_request_error"
        assert raised.value.param == param
