"""The OpenAI Agents SDK (`openai-agents`), unchanged, against the real service: its Responses
model pointed at our /v1 runs an agent with one function tool, whose result is the run's final
output (`stop_on_first_tool`). The tiny model's call is generated under the tool grammar, so its
arguments are the tool's (a city from the enum); the SDK runs the tool on them.

Not here: an agent that answers in text after the tool's result (`run_llm_again`). Its last turn
is free text, which the tiny random model does not end within the token limit (an incomplete
turn is the SDK's error), and SmolLM2-135M calls the tool again each turn; the model reading a
`function_call_output` is tested with the `openai` SDK (test_openai_responses.py)."""
from __future__ import annotations

import asyncio
from typing import Literal

import openai
import pytest
from agents import (Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_trace_processors,
                    set_tracing_disabled)
from agents.items import ToolCallItem, ToolCallOutputItem

set_tracing_disabled(True)  # no tracing export: nothing outside the machine is reached
set_trace_processors([])

calls: list[str] = []
MAX_TOKENS = 60


@function_tool
def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather now in a city."""
    calls.append(city)
    return f"It is sunny in {city}, 21 C."


@pytest.fixture
def model(service):  # one per test: an async client belongs to the event loop that first used it
    client = openai.AsyncOpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)
    return OpenAIResponsesModel(model="tiny", openai_client=client)


def agent(model, **kwargs) -> Agent:
    return Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather], model=model,
                 model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=MAX_TOKENS), **kwargs)


def test_agent_final_output_is_the_tool_result(model):
    calls.clear()
    result = Runner.run_sync(agent(model, tool_use_behavior="stop_on_first_tool"), "Weather in Rome?", max_turns=2)
    assert len(calls) == 1 and calls[0] in ("Paris", "Rome")
    assert result.final_output == f"It is sunny in {calls[0]}, 21 C."
    (call,) = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    (output,) = [i for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert call.raw_item.name == "get_weather" and call.raw_item.call_id == output.raw_item["call_id"]
    assert result.raw_responses[0].response_id.startswith("resp_") and result.raw_responses[0].usage.input_tokens > 0


def test_streamed_agent_run(model):
    calls.clear()

    async def run():
        streamed = Runner.run_streamed(agent(model, tool_use_behavior="stop_on_first_tool"), "Weather in Paris?",
                                       max_turns=2)
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed, kinds

    streamed, kinds = asyncio.run(run())
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert len(calls) == 1 and streamed.final_output == f"It is sunny in {calls[0]}, 21 C."
