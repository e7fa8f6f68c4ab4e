"""Chat messages as the model's template sees them, so that the model reads the whole conversation:

- content parts joined with no separator;
- `developer` (OpenAI's newer name for `system`) as `system`;
- legacy `function_call` and `function` messages as `tool_calls` and `tool` messages;
- an assistant's `tool_calls` with `arguments` as an object (transformers' templates `tojson` a
  dict); for a template that does not render `tool_calls`, the calls become the message's text in
  the shape the tool grammar generates (`{"name": ..., "arguments": {...}}`, TGI's tool prompt
  asks for it), so the model still sees the calls it already made.
"""
from __future__ import annotations

import json

from web.errors import ValidationError

ROLE_ALIASES = {"developer": "system", "function": "tool"}


def template_messages(messages: list[dict], renders_tool_calls: bool) -> list[dict]:
    return [_template_message(message, renders_tool_calls) for message in messages]


def _template_message(message: dict, renders_tool_calls: bool) -> dict:
    out = {key: value for key, value in message.items() if value is not None and key != "function_call"}
    out["role"] = ROLE_ALIASES.get(out["role"], out["role"])
    out["content"] = _text(message.get("content"))
    calls = out.pop("tool_calls", None) or _legacy_call(message.get("function_call"))
    if calls:
        calls = template_tool_calls(calls)
        if renders_tool_calls:
            out["tool_calls"] = calls
        else:
            out["content"] = "\n".join([*filter(None, [out["content"]]), *map(_call_text, calls)])
    return out


def _text(content) -> str:
    if not isinstance(content, list):
        return content if content is not None else ""
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValidationError(f"only text content parts are supported. Given: {str(part.get('type'))[:32]!r}",
                                  param="messages")
    return "".join(part["text"] for part in content)


def _legacy_call(function_call) -> list:
    if not isinstance(function_call, dict):
        return []
    return [{"type": "function", "function": function_call}]


def template_tool_calls(calls: list) -> list:
    """`arguments` as an object (OpenAI sends a JSON string)."""
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = function["arguments"]
            call = {**call, "function": {**function, "arguments": arguments}}
        out.append(call)
    return out


def _call_text(call) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return json.dumps(call, ensure_ascii=False)
    return json.dumps({"name": function.get("name"), "arguments": function.get("arguments", {})},
                      ensure_ascii=False)
