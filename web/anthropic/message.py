"""A chat completion body (one choice) as Anthropic's Message: `text` and `tool_use` blocks, the
stop reason, and the usage (the prompt tokens read from a replica's prefix cache apart, as
Anthropic counts `cache_read_input_tokens` apart from `input_tokens`)."""
from __future__ import annotations

import json
import uuid

from web.anthropic.stop import StopCut


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_use_id(call_id: str) -> str:
    """Anthropic's id prefix for a chat call id (`call_...`)."""
    return "toolu_" + call_id.removeprefix("call_")


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


def chat_usage(chat: dict) -> dict:
    counts = chat.get("usage") or {}
    cached = (counts.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0), cached)


def message(chat: dict, stops: list[str], model: str) -> dict:
    choice = chat["choices"][0]
    answer, cut = choice["message"], StopCut(stops)
    text = cut.feed(answer.get("content") or "") + cut.finish()
    content = [{"type": "text", "text": text}] if text else []
    content += [tool_use_block(call, call_input(call["function"]["arguments"]))
                for call in answer.get("tool_calls") or []]
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": cut.stop_reason(choice["finish_reason"]), "stop_sequence": cut.matched,
            "usage": chat_usage(chat)}


def call_input(arguments: str) -> dict:
    """A call's arguments as an object; a call cut by `max_tokens` (JSON unfinished) has none."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_block(call: dict, arguments: dict) -> dict:
    return {"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"], "input": arguments}
