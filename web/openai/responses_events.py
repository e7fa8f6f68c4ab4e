"""A chat stream's chunks (one choice, then its usage chunk) as the Responses API's events, each
with its `event:` line and a `sequence_number`: response.created, response.in_progress; per output
item response.output_item.added, then for a message response.content_part.added,
response.output_text.delta... .done, response.content_part.done, for a call
response.function_call_arguments.delta... .done; response.output_item.done; then
response.completed (or response.incomplete) with the whole response. A keep-alive comment passes
as it is; an error chunk is response.failed, which ends the stream."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator

from web import sse
from web.errors import ApiError
from web.openai.responses_output import (ResponseFrame, call_item, chat_usage, message_item, new_id, status_of,
                                         text_part)

_DATA = "data: "


class ResponseEvents:
    def __init__(self, frame: ResponseFrame, on_done: Callable[[dict], None]):
        """`on_done`: given the finished response (to store it)."""
        self._frame, self._on_done = frame, on_done
        self._sequence = 0
        self._output: list[dict] = []  # items finished
        self._open: dict | None = None  # the item being streamed (its text or arguments so far)
        self._finish: str | None = None

    def frames(self, chat_frames: Iterable[str]) -> Iterator[str]:
        started = self._frame.body("in_progress", [])
        yield self._event("response.created", response=started)
        yield self._event("response.in_progress", response=started)
        for frame in chat_frames:
            if not frame.startswith(_DATA):
                yield frame  # keep-alive
                continue
            data = frame[len(_DATA):].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                yield from self._failed(chunk["error"])
                return
            yield from self._chunk(chunk)

    def _chunk(self, chunk: dict) -> Iterator[str]:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield from self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                yield from self._call(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if chunk.get("usage"):
            yield from self._close()
            status = status_of(self._finish)
            body = self._frame.body(status, self._output, chat_usage(chunk))
            try:
                self._on_done(body)
            except ApiError as error:  # not stored: the client must not count on it
                yield from self._failed({"message": error.message})
                return
            yield self._event(f"response.{status}", response=body)

    def _text(self, text: str) -> Iterator[str]:
        if self._open is None or self._open["type"] != "message":
            yield from self._close()
            self._open = message_item(new_id("msg"), "", "in_progress")
            yield self._added()
            yield self._event("response.content_part.added", **self._where(), content_index=0, part=text_part(""))
            self._open["content"] = [text_part("")]
        self._open["content"][0]["text"] += text
        yield self._event("response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[])

    def _call(self, call: dict) -> Iterator[str]:
        function = call.get("function") or {}
        if call.get("id"):  # a call's first delta: its id and name
            yield from self._close()
            self._open = call_item(new_id("fc"), call["id"], function.get("name"), "", "in_progress")
            yield self._added()
        if function.get("arguments") and self._open is not None:
            self._open["arguments"] += function["arguments"]
            yield self._event("response.function_call_arguments.delta", **self._where(), delta=function["arguments"])

    def _added(self) -> str:
        return self._event("response.output_item.added", output_index=len(self._output), item=dict(self._open))

    def _close(self) -> Iterator[str]:
        item = self._open
        if item is None:
            return
        item["status"] = status_of(self._finish)
        if item["type"] == "message":
            part = item["content"][0]
            yield self._event("response.output_text.done", **self._where(), content_index=0, text=part["text"],
                              logprobs=[])
            yield self._event("response.content_part.done", **self._where(), content_index=0, part=part)
        else:
            yield self._event("response.function_call_arguments.done", **self._where(), name=item["name"],
                              arguments=item["arguments"])
        yield self._event("response.output_item.done", output_index=len(self._output), item=item)
        self._output.append(item)
        self._open = None

    def _failed(self, error: dict) -> Iterator[str]:
        failure = {"code": "server_error", "message": error.get("message") or "generation failed"}
        yield self._event("response.failed", response=self._frame.body("failed", self._output, error=failure))

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self._output)}

    def _event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\n" + sse.frame(payload)
