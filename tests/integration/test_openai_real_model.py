"""Sanity answers from the default model (SmolLM2-135M-Instruct) through its own chat
template and the official `openai` client."""
from __future__ import annotations

import json

import jsonschema
import openai


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
