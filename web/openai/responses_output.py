"""The Responses API's response object, from a chat answer: `output` items (a `message` with one
`output_text` part, then a `function_call` per tool call), `status` (`incomplete` with
`incomplete_details.reason: max_output_tokens` when the length ran out) and `usage` (with the
prompt tokens read from a replica's prefix cache). Pure functions, no Flask.

A stored response also keeps its conversation as chat messages (`answer_messages`), which a
request naming it in `previous_response_id` continues."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ResponseFrame:
    """What the response object repeats from its request, and its id."""

    id: str
    created_at: int
    model: str
    request: dict  # the parsed body

    @classmethod
    def new(cls, model: str, request: dict) -> "ResponseFrame":
        return cls(new_id("resp"), int(time.time()), model, request)

    def body(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        request = self.request
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": incomplete, "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"), "model": self.model, "output": output,
            "parallel_tool_calls": request.get("parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"), "reasoning": None,
            "store": request.get("store", True), "temperature": request.get("temperature"),
            "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice") or "auto", "tools": request.get("tools") or [],
            "top_p": request.get("top_p"), "truncation": "disabled", "usage": usage, "user": request.get("user"),
            "metadata": request.get("metadata") or {},
        }


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def chat_usage(chat: dict) -> dict:
    counts = chat.get("usage") or {}
    cached = (counts.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0), cached)


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text)] if status != "in_progress" else []}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response(frame: ResponseFrame, chat: dict) -> dict:
    """The response for a chat completion body (one choice)."""
    choice = chat["choices"][0]
    answer, status = choice["message"], status_of(choice["finish_reason"])
    output = [message_item(new_id("msg"), answer["content"], status)] if answer.get("content") else []
    output += [call_item(new_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"], status)
               for call in answer.get("tool_calls") or []]
    return frame.body(status, output, chat_usage(chat))


def answer_messages(output: list[dict]) -> list[dict]:
    """A response's output as the chat messages that continue its conversation."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if not text and not calls:
        return []
    message = {"role": "assistant", "content": text or None}
    return [{**message, "tool_calls": calls} if calls else message]
