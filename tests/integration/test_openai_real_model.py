"""Sanity answers from the default model (SmolLM2-135M-Instruct) through its own chat
template and the official `openai` client."""
from __future__ import annotations

import json

import jsonschema
import openai
import requests


def test_chat_answers_the_capital_of_france(real_service):
    client = openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", timeout=300, max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == "smollm2"
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content


def test_a_weather_tool_is_called_for_the_city_asked_about(real_service):
    """The template does not render tools: they reach the model after the question (TGI's tool prompt)."""
    client = openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", timeout=300, max_retries=0)
    parameters = {"type": "object", "properties": {"location": {"type": "string", "maxLength": 40}},
                  "required": ["location"], "additionalProperties": False}
    weather = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                                "parameters": parameters}}
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[weather], tool_choice="required", temperature=0, max_tokens=40)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters)
    assert "Paris" in arguments["location"]


def real_client(real_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", timeout=300, max_retries=0)


def templated(real_service, **body) -> str:
    response = requests.post(f"{real_service.base_url}/chat_tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["templated_text"]


def test_a_stop_string_is_not_in_the_answer(real_service):
    """The issue's case: `stop: ["Paris"]` used to return "...is Paris"."""
    client = real_client(real_service)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    free = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24)
    content = free.choices[0].message.content
    assert "Paris" in content
    answer = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24,
                                            stop=["Paris"])
    assert answer.choices[0].message.content == content[:content.index("Paris")]
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=24,
                                                 stop=["Paris"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        answer.choices[0].message.content


def test_logprobs_end_with_the_last_token_of_the_text(real_service):
    """SmolLM2 ends its answers with <|im_end|>: no entry for it; the bytes rebuild the text."""
    client = real_client(real_service)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=40,
        logprobs=True)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    tokens = [entry.token for entry in choice.logprobs.content]
    assert "<|im_end|>" not in tokens and answer.usage.completion_tokens == len(tokens) + 1
    assert b"".join(bytes(entry.bytes) for entry in choice.logprobs.content).decode() == choice.message.content


def test_developer_is_the_system_turn(real_service):
    text = templated(real_service, messages=[{"role": "developer", "content": "Answer in French."},
                                             {"role": "user", "content": "Hello"}])
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHello")
    assert "developer" not in text and "SmolLM" not in text  # no default system prompt before it


def test_a_tool_conversation_shows_the_first_call_to_the_model(real_service):
    """SmolLM2's template does not render `tool_calls`: the call becomes the assistant's text, in the
    shape the tool grammar generates, so the model sees it made the call (and does not loop)."""
    client = real_client(real_service)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 40}},
                       "required": ["location"], "additionalProperties": False}}}
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[weather],
                                           tool_choice="required", temperature=0, max_tokens=40)
    [call] = first.choices[0].message.tool_calls
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    text = templated(real_service, messages=messages, tools=[weather])
    assert json.dumps({"name": "get_weather", "arguments": json.loads(call.function.arguments)}) in text
    assert "<|im_start|>tool\n22 degrees and sunny\n---\n" in text  # then the tools, as TGI shows them
