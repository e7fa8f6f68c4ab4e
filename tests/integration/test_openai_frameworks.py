"""What users build on the `openai` client, unchanged, against the real service and the default model
(SmolLM2-135M-Instruct): langchain-openai and litellm recognize a context overflow (so their
trimming and fallbacks start), and a langchain `bind_tools` round trip (call, tool result,
answer) completes with the first call shown to the model in the second request."""
from __future__ import annotations

import json
import os

import httpx
import pytest
import requests

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import
import litellm  # noqa: E402
from langchain_core.exceptions import ContextOverflowError  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

TOO_LONG = "Tell me about this: " + "the queue " * 700  # ~1,400 tokens, over --max-input-tokens 1024


@tool
def get_weather(location: str) -> str:
    """The current weather in a city."""
    return f"It is 22 degrees and sunny in {location}."


def chat_model(real_service, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", model="smollm2", temperature=0,
                      max_retries=0, timeout=300, **kwargs)


def test_langchain_recognizes_a_context_overflow(real_service):
    with pytest.raises(ContextOverflowError) as raised:
        chat_model(real_service, max_tokens=8).invoke(TOO_LONG)
    assert "maximum context length is 1024 tokens" in str(raised.value)


def test_litellm_recognizes_a_context_overflow(real_service):
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/smollm2", api_base=f"{real_service.base_url}/v1", api_key="-",
                           messages=[{"role": "user", "content": TOO_LONG}], max_tokens=8, num_retries=0)


def test_a_bind_tools_round_trip_completes_and_the_model_sees_its_call(real_service):
    sent = []  # every request body langchain sends
    http_client = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    model = chat_model(real_service, max_tokens=60, http_client=http_client)
    messages = [HumanMessage("What is the weather like in Paris today?")]
    call_message = model.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    [call] = call_message.tool_calls
    assert call["name"] == "get_weather" and "Paris" in call["args"]["location"]
    messages += [call_message, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    # The answer, tools still bound: a 135M model under `auto` calls again even with its call shown.
    answer = model.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert answer.content and not answer.tool_calls
    second = requests.post(f"{real_service.base_url}/chat_tokenize", json=sent[-1], timeout=60).json()
    assert json.dumps({"name": "get_weather", "arguments": call["args"]}) in second["templated_text"]
    assert "It is 22 degrees and sunny in" in second["templated_text"]
