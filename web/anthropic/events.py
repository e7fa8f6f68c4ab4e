"""A chat stream's chunks (one choice, with its usage chunk) as Anthropic's events:
message_start, then per block content_block_start / content_block_delta (`text_delta`,
`input_json_delta`) / content_block_stop, then message_delta (stop reason, usage) and
message_stop. A keep-alive is a `ping`; an error chunk an `error` event, which ends the stream."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from web import sse
from web.anthropic.errors import from_openai
from web.anthropic.message import chat_usage, tool_use_id
from web.anthropic.stop import StopCut

_DATA = "data: "
_DONE = "[DONE]"


def event(payload: dict) -> str:
    """`event: <type>` then its data: the `anthropic` SDK dispatches on the event name."""
    return f"event: {payload['type']}\n" + sse.frame(payload)


class EventWriter:
    def __init__(self, message_id: str, model: str, prompt_tokens: int, stops: list[str]):
        self._start = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                       "stop_reason": None, "stop_sequence": None,
                       "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
        self._cut = StopCut(stops)
        self._blocks = 0  # blocks started
        self._open: str | None = None  # the open block's type
        self._finish = "stop"  # the chat finish reason

    def frames(self, chat_frames: Iterable[str]) -> Iterator[str]:
        yield event({"type": "message_start", "message": self._start})
        for frame in chat_frames:
            if not frame.startswith(_DATA):  # a keep-alive comment
                yield event({"type": "ping"})
                continue
            data = frame[len(_DATA):].strip()
            if data == _DONE:
                return
            chunk = json.loads(data)
            if "error" in chunk:
                yield event(from_openai(chunk))
                return
            yield from self._chunk(chunk)

    def _chunk(self, chunk: dict) -> Iterator[str]:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield from self._text(self._cut.feed(delta["content"]))
            for call in delta.get("tool_calls") or []:
                yield from self._call(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                yield from self._text(self._cut.finish())
        if chunk.get("usage"):
            yield from self._close()
            reason = self._cut.stop_reason(self._finish)
            yield event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": self._cut.matched},
                         "usage": chat_usage(chunk)})
            yield event({"type": "message_stop"})

    def _text(self, text: str) -> Iterator[str]:
        if not text:
            return
        if self._open != "text":
            yield from self._open_block({"type": "text", "text": ""})
        yield event({"type": "content_block_delta", "index": self._blocks - 1,
                     "delta": {"type": "text_delta", "text": text}})

    def _call(self, call: dict) -> Iterator[str]:
        function = call.get("function") or {}
        if call.get("id"):  # a call's first delta: its id and name
            yield from self._open_block({"type": "tool_use", "id": tool_use_id(call["id"]),
                                         "name": function.get("name"), "input": {}})
        if function.get("arguments"):
            yield event({"type": "content_block_delta", "index": self._blocks - 1,
                         "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}})

    def _open_block(self, block: dict) -> Iterator[str]:
        yield from self._close()
        yield event({"type": "content_block_start", "index": self._blocks, "content_block": block})
        self._blocks, self._open = self._blocks + 1, block["type"]

    def _close(self) -> Iterator[str]:
        if self._open is not None:
            yield event({"type": "content_block_stop", "index": self._blocks - 1})
            self._open = None
