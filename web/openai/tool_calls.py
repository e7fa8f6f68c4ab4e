"""A choice's output under the tool grammar (`{"name": ..., "arguments": {...}}`, see
`web.openai.tools`) read token by token and turned into OpenAI's shapes: `tool_calls` deltas
while it streams, and the same call (or the `no_tool` text) in a whole message.

The non-streamed message is built by feeding the whole text through the same reader, so a
stream's argument fragments join to exactly the non-streamed `arguments` string: the JSON text
of the `arguments` value as generated. A call cut by `max_tokens` is still a call (its arguments
so far, `finish_reason: length`): the wrapper JSON never reaches `content`. Deltas carry no
`role`: the stream adds it to a choice's first chunk.
"""
from __future__ import annotations

import json
import re
import uuid

from web.openai.tools import NO_TOOL

# The wrapper up to the arguments value's first character (the name must be closed).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)("?)')  # the name so far; closed or not
_CONTENT_HEAD = re.compile(r'\{\s*"content"\s*:\s*"')
_LONGEST_ESCAPE = 12  # a \uXXXX\uXXXX surrogate pair


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class JsonValueEnd:
    """Finds where one JSON value ends in text given piece by piece (strings and nesting aware)."""

    def __init__(self):
        self.depth, self.in_string, self.escaped = 0, False, False
        self.seen = 0  # characters read
        self.end: int | None = None  # offset just past the value, once known

    def feed(self, text: str) -> int | None:
        for ch in text:
            if self.end is not None:
                break
            self._step(ch)
            self.seen += 1
        return self.end

    def _step(self, ch: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 0:
                    self.end = self.seen + 1
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            if self.depth == 0:  # a bare scalar, ended by the wrapper's brace
                self.end = self.seen
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.seen + 1
        elif self.depth == 0 and self.seen > 0 and (ch == "," or ch.isspace()):
            self.end = self.seen


class ToolCallReader:
    """One choice: `feed` each token's text, get the deltas to send; `finish` at the end."""

    def __init__(self, call_id: str | None = None, names: tuple[str, ...] = ()):
        """`names`: the functions the grammar allows, to name a call cut inside its name."""
        self.call_id = call_id or new_call_id()
        self.names = names
        self.text = ""
        self.name: str | None = None  # the function called (NO_TOOL: a text answer)
        self.arguments = ""  # the arguments' JSON text, as sent
        self.content = ""  # no_tool's text answer
        self.complete = False  # the arguments value (or no_tool's content) was read to its end
        self._body = 0  # where the arguments value starts in `text`
        self._scanner = JsonValueEnd()
        self._content_start: int | None = None  # no_tool: where the content string starts in `text`
        self._content_raw_sent = 0  # no_tool: characters of the JSON string decoded so far

    @property
    def called(self) -> bool:
        return self.name is not None and self.name != NO_TOOL

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        deltas = []
        if self.name is None:
            head = _HEAD.match(self.text)
            if head is None:
                return []
            deltas.extend(self._named(_json_string(head.group(1)), head.end()))
        fragment = self._content_fragment() if self.name == NO_TOOL else self._arguments_fragment()
        if fragment:
            deltas.append(self._delta(fragment))
        return deltas

    def finish(self) -> list[dict]:
        """An output cut before its arguments began is still a call: named as far as it was
        generated (in full when only one allowed function starts that way), no arguments."""
        if self.name is not None:
            return []
        head = _NAME.match(self.text)
        if head is None:  # not even the name began: nothing to call
            return []
        written = _json_string(head.group(1))
        candidates = [name for name in self.names if name.startswith(written)]
        name = candidates[0] if len(candidates) == 1 and not head.group(2) else written
        return self._named(name, len(self.text)) if name else []

    def message(self) -> dict:
        if self.called:
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": self.call_id, "type": "function",
                 "function": {"name": self.name, "arguments": self.arguments}}]}
        return {"role": "assistant", "content": self.content if self.name == NO_TOOL else None}

    def _named(self, name: str, body: int) -> list[dict]:
        self.name, self._body = name, body
        if not self.called:
            return []
        return [{"content": None, "tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                                  "function": {"name": self.name, "arguments": ""}}]}]

    def finish_reason(self, reason: str) -> str:
        """`tool_calls` for a whole call; a cut one keeps `length`."""
        return "tool_calls" if self.called and self.complete and reason == "stop" else reason

    def _delta(self, fragment: str) -> dict:
        if self.called:
            return {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
        return {"content": fragment}

    def _arguments_fragment(self) -> str:
        end = self._scanner.feed(self.text[self._body + self._scanner.seen:])
        self.complete = end is not None
        stop = len(self.text) if end is None else self._body + end
        fragment = self.text[self._body + len(self.arguments):stop]
        self.arguments += fragment
        return fragment

    def _content_fragment(self) -> str:
        """no_tool: the `content` string decoded as far as whole escapes allow."""
        if self._content_start is None:
            head = _CONTENT_HEAD.match(self.text, self._body)
            if head is None:
                return ""
            self._content_start = head.end()
            self._scanner.feed('"')  # now reads the string from its opening quote
        start = self._content_start
        end = self._scanner.feed(self.text[start + self._scanner.seen - 1:])
        self.complete = end is not None
        raw = self.text[start:] if end is None else self.text[start:start + end - 2]  # without the quote
        decoded, upto = _decode_prefix(raw, self._content_raw_sent)
        self._content_raw_sent = upto
        self.content += decoded
        return decoded


def _json_string(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:  # not from the grammar (whose names are constants): keep it as written
        return raw


def _decode_prefix(raw: str, start: int) -> tuple[str, int]:
    """The JSON string characters raw[start:k] decoded, for the largest k that ends on a whole
    escape (and not inside a surrogate pair); (text, k)."""
    for k in range(len(raw), max(start, len(raw) - _LONGEST_ESCAPE) - 1, -1):
        try:
            text = json.loads(f'"{raw[start:k]}"')
        except ValueError:
            continue
        if text and "\ud800" <= text[-1] <= "\udbff":
            continue
        return text, k
    return "", start


def as_function_call(delta: dict) -> dict:
    """A message or delta in the legacy shape (a request that sent `functions`): its call as
    `function_call` {name, arguments}, no id."""
    calls = delta.get("tool_calls")
    if not calls:
        return delta
    out = {key: value for key, value in delta.items() if key != "tool_calls"}
    function = calls[0]["function"]
    out["function_call"] = {key: function[key] for key in ("name", "arguments") if key in function}
    return out
