"""A Responses API request (already type-checked by `web.openai.responses_schemas`) as the chat body
`web.openai.params.chat_plan` reads, so that it takes the chat route's whole path: `instructions`
as the system message, `input` items as messages, flat function tools as chat's, `text.format` as
`response_format`, `max_output_tokens` as `max_tokens`. A previous response's conversation (its
input and output, as chat messages) goes before this input.

Items: a message (`input_text` / `output_text` parts, or a string), a `function_call` (an assistant
message's `tool_calls`; consecutive calls join one message), a `function_call_output` (a `tool`
message). `reasoning` items are dropped (the model makes none); anything else is refused.
"""
from __future__ import annotations

from web.errors import ValidationError

_TEXT_PARTS = ("input_text", "output_text", "text")
_SKIPPED_ITEMS = ("reasoning",)


def conversation(items) -> list[dict]:
    """The chat messages of `input` (a string, or a list of items)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for number, item in enumerate(items):
        kind = item.get("type") or "message"
        if kind == "message":
            messages.append({"role": _field(item, "role", number), "content": _text(item.get("content"), number)})
        elif kind == "function_call":
            _add_call(messages, item, number)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", number),
                             "content": _text(item.get("output"), number)})
        elif kind not in _SKIPPED_ITEMS:
            raise ValidationError(f"`input.{number}`: item type {str(kind)[:32]!r} is not supported (message, "
                                  "function_call and function_call_output are)", param="input")
    return messages


def chat_body(body: dict, previous: list[dict]) -> dict:
    """The chat body for `body`, after the `previous` conversation's messages."""
    if body.get("background"):
        raise ValidationError("`background` is not supported: create the response and wait for it (or stream it)",
                              param="background")
    if body.get("previous_response_id") is None and isinstance(body["input"], list) and not body["input"]:
        raise ValidationError("`input` cannot be empty", param="input")
    instructions = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    chat = {
        "model": body.get("model"),
        "messages": [*instructions, *previous, *conversation(body["input"])],
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stream": bool(body.get("stream")),
        "stream_options": {"include_usage": True} if body.get("stream") else None,
        "response_format": _response_format((body.get("text") or {}).get("format")),
    }
    if body.get("tools"):
        chat["tools"] = [_tool(tool, number) for number, tool in enumerate(body["tools"])]
        chat["tool_choice"] = _tool_choice(body.get("tool_choice"))
    return chat


def _add_call(messages: list[dict], item: dict, number: int) -> None:
    call = {"id": _field(item, "call_id", number), "type": "function",
            "function": {"name": _field(item, "name", number), "arguments": item.get("arguments") or "{}"}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
        last["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _text(content, number: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValidationError(f"`input.{number}`: only text content is supported. "
                                  f"Given: {str(part.get('type'))[:32]!r}", param="input")
    return "".join(part["text"] for part in content)


def _field(item: dict, name: str, number: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"`input.{number}.{name}` is required", param="input")
    return value


def _tool(tool: dict, number: int) -> dict:
    if tool.get("type") != "function" or not tool.get("name"):
        raise ValidationError(f"`tools.{number}`: only function tools are supported "
                              '({"type": "function", "name", "description", "parameters"})', param="tools")
    # In OpenAI's order (name, description, parameters): the template shows the tools as JSON.
    described = {"description": tool["description"]} if tool.get("description") else {}
    return {"type": "function", "function": {"name": tool["name"], **described, "parameters": tool.get("parameters")}}


def _tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValidationError('`tool_choice` must be "none", "auto", "required" or {"type": "function", "name": ...}',
                          param="tool_choice")


def _response_format(fmt: dict | None) -> dict | None:
    """`text.format`: Responses' flat json_schema (`name`, `schema`, `strict`) as chat's."""
    if not fmt or fmt.get("type") == "text":  # (a dict: the schema says so)
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt.get("schema")}}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    raise ValidationError(f"`text.format` type must be one of text, json_schema, json_object. "
                          f"Given: {str(fmt.get('type'))[:32]!r}", param="text")
