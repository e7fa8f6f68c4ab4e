"""An Anthropic Messages request (already type-checked by `web.anthropic.schemas`) as the chat
body `web.openai.params.chat_plan` reads, so that it takes the chat route's whole path (template,
tool grammar, `output_config.format` as `response_format`, validation, limits). Only what that
path cannot see is kept aside: `top_k`, and the stop sequences, which `web.anthropic.stop` cuts
itself to say which one matched.

Blocks map one to one: `text` → text, an assistant's `tool_use` → a `tool_calls` entry (its
`input` as the JSON arguments), a user's `tool_result` → a `tool` message (before the turn's
text, which answers after the results). Images and documents are refused.
"""
from __future__ import annotations

import json

from web.errors import ValidationError

# Anthropic's tool_choice types -> chat's.
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def chat_body(body: dict) -> dict:
    """The chat body for `body` (whose `stream`, `stop_sequences`, `top_k` the caller handles)."""
    messages = [*_system(body.get("system")), *_messages(body["messages"])]
    chat = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body["max_tokens"],
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stop": list(body.get("stop_sequences") or []) or None,
        "stream": bool(body.get("stream")),
        "stream_options": {"include_usage": True} if body.get("stream") else None,
    }
    output_format = (body.get("output_config") or {}).get("format")
    if output_format:
        chat["response_format"] = _response_format(output_format)
    tools = body.get("tools")
    if tools:
        chat["tools"] = [_tool(tool) for tool in tools]
        chat["tool_choice"] = _tool_choice(body.get("tool_choice"))
    elif (body.get("tool_choice") or {}).get("type") not in (None, "none", "auto"):
        raise ValidationError("`tool_choice` needs `tools`", param="tool_choice")
    return chat


def _response_format(output_format: dict) -> dict:
    """`output_config.format` (`{"type": "json_schema", "schema": ...}`) as chat's, for its grammar."""
    if output_format.get("type") != "json_schema" or not isinstance(output_format.get("schema"), dict):
        raise ValidationError('`output_config.format` must be {"type": "json_schema", "schema": <JSON schema>}',
                              param="output_config")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output_format["schema"]}}


def _system(system) -> list[dict]:
    if system is None or system == "" or system == []:
        return []
    return [{"role": "system", "content": system if isinstance(system, str) else _text_blocks(system, "system")}]


def _messages(messages: list[dict]) -> list[dict]:
    if not messages:
        raise ValidationError("`messages` must have at least one message", param="messages")
    out = []
    for number, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif message["role"] == "assistant":
            out.append(_assistant(content, number))
        else:
            out.extend(_user(content, number))
    return out


def _assistant(blocks: list[dict], number: int) -> dict:
    text = _text_blocks([b for b in blocks if b["type"] != "tool_use"], f"messages.{number}.content")
    where = f"messages.{number}.content"
    calls = [{"id": _required(b, "id", where), "type": "function",
              "function": {"name": _required(b, "name", where),
                           "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}}
             for b in blocks if b["type"] == "tool_use"]
    message = {"role": "assistant", "content": text or (None if calls else "")}
    return {**message, "tool_calls": calls} if calls else message


def _user(blocks: list[dict], number: int) -> list[dict]:
    results = [{"role": "tool", "tool_call_id": _required(b, "tool_use_id", f"messages.{number}.content"),
                "content": _result_text(b, number)}
               for b in blocks if b["type"] == "tool_result"]
    text = _text_blocks([b for b in blocks if b["type"] != "tool_result"], f"messages.{number}.content")
    return [*results, {"role": "user", "content": text}] if text or not results else results


def _required(block: dict, name: str, where: str) -> str:
    if not block.get(name):
        raise ValidationError(f"`{where}`: a {block['type']} block needs `{name}`", param="messages")
    return block[name]


def _result_text(block: dict, number: int) -> str:
    content = block.get("content")
    text = content if isinstance(content, str) else _text_blocks(content or [], f"messages.{number}.content")
    return f"Error: {text}" if block.get("is_error") else text


def _text_blocks(blocks: list[dict], where: str) -> str:
    """The text of `text` blocks, joined with no separator; any other block is refused."""
    for block in blocks:
        if block["type"] != "text" or not isinstance(block.get("text"), str):
            raise ValidationError(f"`{where}`: only text, tool_use and tool_result blocks are supported. "
                                  f"Given: {str(block['type'])[:32]!r}", param="messages")
    return "".join(block["text"] for block in blocks)


def _tool(tool: dict) -> dict:
    if tool.get("type") not in (None, "custom"):
        raise ValidationError(f"only client tools (name, description, input_schema) are supported. "
                              f"Given: {str(tool['type'])[:32]!r}", param="tools")
    # In OpenAI's order (name, description, parameters): the template shows the tools as JSON.
    described = {"description": tool["description"]} if tool.get("description") else {}
    return {"type": "function", "function": {"name": tool["name"], **described, "parameters": tool["input_schema"]}}


def _tool_choice(choice: dict | None):
    if choice is None:
        return "auto"
    if choice["type"] == "tool":
        if not choice.get("name"):
            raise ValidationError('`tool_choice` of type "tool" needs a `name`', param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice["type"] not in _CHOICES:
        raise ValidationError(f'`tool_choice` type must be one of auto, any, tool, none. '
                              f'Given: {str(choice["type"])[:32]!r}', param="tool_choice")
    return _CHOICES[choice["type"]]
