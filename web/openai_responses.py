"""OpenAI response bodies and stream chunks (chat and completions), built from our generation
results: pure functions and small value types, no Flask.

A choice's text is the concatenation of its tokens' texts, special tokens shown as nothing (as
the final `generated_text` is), so a streamed answer joins to the non-streamed one. Under a tool
grammar, that text is read by `web.openai_tool_calls` into `tool_calls` (or a text answer).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import common
from web.openai_params import ResponseOptions
from web.openai_tool_calls import ToolCallReader

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}  # TGI's -> OpenAI's
SYSTEM_FINGERPRINT = f"{common.__version__}-native"


def finish_reason(tgi_reason: str | None) -> str:
    return FINISH_REASONS.get(tgi_reason or "length", "stop")


def token_text(token: dict) -> str:
    """What a token adds to the answer's text."""
    return "" if token.get("special") else token.get("text") or ""


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_prompt_tokens(cached: list[int], n: int) -> int:
    """Prompt tokens read from a replica's prefix cache, counted once per prompt as
    `prompt_tokens` is: each prompt's first choice (`cached`: per choice, in choice order)."""
    return sum(count for index, count in enumerate(cached) if index % n == 0)


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice."""

    index: int
    text: str
    finish_reason: str  # OpenAI's
    generated_tokens: int
    tokens: list[dict] = field(default_factory=list)  # TGI Token dicts
    top_tokens: list[list[dict]] = field(default_factory=list)
    cached_tokens: int = 0  # of its prompt, from the replica's prefix cache


@dataclass(frozen=True)
class Envelope:
    """What every body and chunk of one response shares."""

    kind: str  # "chat" | "completion"
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, kind: str, model: str) -> "Envelope":
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return cls(kind, model, prefix + uuid.uuid4().hex, int(time.time()))

    def body(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}


# Chat.
def chat_logprob(token: dict, top: list[dict] | None) -> dict:
    entry = _chat_alternative(token)
    entry["top_logprobs"] = [_chat_alternative(t) for t in top or []]
    return entry


def _chat_alternative(token: dict) -> dict:
    text = token.get("text") or ""
    return {"token": text, "logprob": token.get("logprob"), "bytes": list(text.encode("utf-8"))}


def chat_completion(envelope: Envelope, options: ResponseOptions, results: list[ChoiceResult],
                    prompt_tokens: int) -> dict:
    choices = []
    for result in results:
        logprobs = None
        if options.logprobs:
            tops = result.top_tokens or [[] for _ in result.tokens]
            logprobs = {"content": [chat_logprob(t, top) for t, top in zip(result.tokens, tops)]}
        message, reason = {"role": "assistant", "content": result.text}, result.finish_reason
        if options.tool_calls:
            reader = ToolCallReader()
            reader.feed(result.text)
            reader.finish()
            message, reason = reader.message(), reader.finish_reason(reason)
        choices.append({"index": result.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
    completion_tokens = sum(r.generated_tokens for r in results)
    cached = cached_prompt_tokens([r.cached_tokens for r in results], options.n)
    return envelope.body("chat.completion", choices, usage=usage(prompt_tokens, completion_tokens, cached))


# Completions (OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset).
def completion_logprobs(tokens: list[dict], tops: list[list[dict]] | None, offset: int) -> dict:
    tops = tops or [[] for _ in tokens]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, top in zip(tokens, tops):
        out["tokens"].append(token.get("text") or "")
        out["token_logprobs"].append(token.get("logprob"))
        out["top_logprobs"].append({t.get("text") or "": t.get("logprob") for t in top})
        out["text_offset"].append(offset)
        offset += len(token_text(token))
    return out


def completion(envelope: Envelope, options: ResponseOptions, results: list[ChoiceResult],
               prompts: list[str], prompt_tokens: int) -> dict:
    choices = []
    for result in results:
        prefix = prompts[result.index // options.n] if options.echo else ""
        logprobs = None
        if options.logprobs:
            logprobs = completion_logprobs(result.tokens, result.top_tokens, len(prefix))
        choices.append({"index": result.index, "text": prefix + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    completion_tokens = sum(r.generated_tokens for r in results)
    cached = cached_prompt_tokens([r.cached_tokens for r in results], options.n)
    return envelope.body("text_completion", choices, usage=usage(prompt_tokens, completion_tokens, cached))


class Chunker:
    """The chunks of one stream: one per token (a tool call's: as many as its reader gives),
    one closing each choice, then the usage."""

    def __init__(self, envelope: Envelope, options: ResponseOptions, prompts: list[str]):
        self.envelope, self.options, self.prompts = envelope, options, prompts
        self._offsets: dict[int, int] = {}  # choice -> characters sent (completions' text_offset)
        self._readers: dict[int, ToolCallReader] = {}  # choice -> its tool call (tool grammar only)

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.envelope.kind == "chat" else "text_completion"

    def _chunk(self, choice: dict) -> dict:
        extra = {"usage": None} if self.options.include_usage else {}
        return self.envelope.body(self._object, [choice], **extra)

    def token(self, index: int, token: dict, top: list[dict] | None) -> list[dict]:
        text = token_text(token)
        if self.options.tool_calls:
            return [self._delta(index, delta) for delta in self._reader(index).feed(text)]
        if self.envelope.kind == "chat":
            logprobs = {"content": [chat_logprob(token, top)]} if self.options.logprobs else None
            return [self._chunk({"index": index, "delta": {"role": "assistant", "content": text},
                                 "logprobs": logprobs, "finish_reason": None})]
        prefix = self._echo(index)
        offset = self._offsets.get(index, 0) + len(prefix)
        logprobs = completion_logprobs([token], [top or []], offset) if self.options.logprobs else None
        self._offsets[index] = offset + len(text)
        return [self._chunk({"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": None})]

    def finish(self, index: int, reason: str) -> list[dict]:
        if self.options.tool_calls:
            reader = self._reader(index)
            chunks = [self._delta(index, delta) for delta in reader.finish()]
            return [*chunks, self._chunk({"index": index, "delta": {}, "logprobs": None,
                                          "finish_reason": reader.finish_reason(reason)})]
        if self.envelope.kind == "chat":
            return [self._chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})]
        prefix = self._echo(index)
        self._offsets[index] = self._offsets.get(index, 0) + len(prefix)
        return [self._chunk({"index": index, "text": prefix, "logprobs": None, "finish_reason": reason})]

    def _reader(self, index: int) -> ToolCallReader:
        return self._readers.setdefault(index, ToolCallReader())

    def _delta(self, index: int, delta: dict) -> dict:
        """A tool-call chunk (no logprobs: a fragment need not be one token)."""
        return self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: list[int]) -> dict:
        """`cached`: each choice's cached prompt tokens, in choice order."""
        cached_tokens = cached_prompt_tokens(cached, self.options.n)
        return self.envelope.body(self._object, [], usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    def _echo(self, index: int) -> str:
        """The prompt, before a completions choice's first text (with `echo`)."""
        if not self.options.echo or index in self._offsets:
            return ""
        return self.prompts[index // self.options.n]
