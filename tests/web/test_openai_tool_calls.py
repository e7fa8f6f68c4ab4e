"""`ToolCallReader`: a tool-grammar output, cut into tokens anywhere, gives the same call (or
text) streamed as whole, and never sends the wrapper around the arguments, even when cut."""
from __future__ import annotations

import json

import pytest

from web.openai.tool_calls import ToolCallReader

CALL = '{"name": "get_weather", "arguments": {"location": "Pa\\"ris}", "days": [1, {"a": "]"}]}}'
NO_TOOL = '{"name": "no_tool", "arguments": {"content": "Hi \\u00e9 \\ud83d\\ude00 \\"q\\" \\\\ end\\n"}}'


def read(text: str, step: int, names=()) -> tuple[ToolCallReader, list[dict]]:
    reader = ToolCallReader("call_1", names=names)
    deltas = []
    for i in range(0, len(text), step):
        deltas += reader.feed(text[i:i + step])
    return reader, deltas + reader.finish()


def joined_arguments(deltas: list[dict]) -> str:
    return "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_a_call_cut_anywhere_streams_its_arguments_exactly(step):
    reader, deltas = read(CALL, step)
    assert deltas[0] == {"content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    arguments = joined_arguments(deltas)
    assert arguments == '{"location": "Pa\\"ris}", "days": [1, {"a": "]"}]}'
    assert json.loads(arguments) == json.loads(CALL)["arguments"]
    assert reader.message()["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": arguments}
    assert reader.message()["content"] is None and reader.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_no_tool_streams_its_decoded_text(step):
    reader, deltas = read(NO_TOOL, step)
    text = 'Hi é 😀 "q" \\ end\n'
    assert "".join(d["content"] for d in deltas) == text and not any("tool_calls" in d for d in deltas)
    assert reader.message() == {"role": "assistant", "content": text} and reader.finish_reason("stop") == "stop"


def test_scalar_arguments_end_at_the_wrapper():
    reader, deltas = read('{"name": "f", "arguments": 12}', 1)
    assert joined_arguments(deltas) == "12" and reader.finish_reason("stop") == "tool_calls"


def test_cut_outputs():
    reader, deltas = read('{"name": "g", "arguments": {"a": "tru', 2)
    assert joined_arguments(deltas) == '{"a": "tru' and reader.finish_reason("length") == "length"
    assert reader.finish_reason("stop") == "stop"  # e.g. a stop sequence: not a whole call


@pytest.mark.parametrize("text, names, name", [
    ('{"name": "get_weather", "arguments', (), "get_weather"),  # the name is whole
    ('{"name": "get_weather"', (), "get_weather"),
    ('{"name": "get_w', ("get_weather", "get_time"), "get_weather"),  # only one allowed name starts so
    ('{"name": "get_', ("get_weather", "get_time"), "get_"),  # two do: the name as far as it came
])
def test_a_call_cut_before_its_arguments_is_still_a_call(text, names, name):
    reader, deltas = read(text, 3, names)
    assert deltas == [{"content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}]}]
    message = reader.message()
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": name, "arguments": ""}
    assert reader.finish_reason("length") == "length"


@pytest.mark.parametrize("text", ['{"na', '{"name": "', ""])
def test_an_output_cut_before_any_name_is_no_call_and_no_wrapper(text):
    reader, deltas = read(text, 2, ("get_weather", "get_time"))
    assert deltas == [] and reader.message() == {"role": "assistant", "content": None}
