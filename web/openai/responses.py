"""OpenAI response bodies (chat and completions), built from our generation results: pure
functions and small value types, no Flask. Stream chunks: `web.openai.chunks`.

Each choice's text goes through `ChoiceText` (stop sequences cut, the tokens received), the same
way a stream's does, so a streamed answer joins to the non-streamed one. Under a tool grammar,
that text is read by `web.openai.tool_calls` into `tool_calls` (or a text answer).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field

import common
from web.openai.choice_text import ChoiceText, ReceivedToken
from web.openai.logprobs import TokenBytes, chat_logprobs, completion_logprobs, prompt_logprobs
from web.openai.params import ResponseOptions
from web.openai.prompts import Prompt
from web.openai.tool_calls import ToolCallReader, as_function_call

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}  # TGI's -> OpenAI's
SYSTEM_FINGERPRINT = f"{common.__version__}-native"


def finish_reason(tgi_reason: str | None) -> str:
    return FINISH_REASONS.get(tgi_reason or "length", "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_prompt_tokens(cached: list[int], samples: int) -> int:
    """Prompt tokens read from a replica's prefix cache, counted once per prompt as
    `prompt_tokens` is: each prompt's first choice (`cached`: per choice, in choice order)."""
    return sum(count for index, count in enumerate(cached) if index % samples == 0)


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice, as the client receives it."""

    index: int
    text: str  # stop sequences cut
    finish_reason: str  # OpenAI's
    generated_tokens: int
    tokens: list[ReceivedToken] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # of every generated token: how `best_of` ranks candidates
    prefill: list[dict] = field(default_factory=list)  # echo with logprobs: the prompt's tokens (TGI's)
    prefill_top: list[list[dict]] = field(default_factory=list)  # and their alternatives

    @classmethod
    def of(cls, index: int, details: dict, generated_tokens: int, options: ResponseOptions) -> "ChoiceResult":
        """From a final event's TGI details (their `tokens` and `top_tokens`, and the prompt's)."""
        prompt = {"prefill": details.get("prefill") or [], "prefill_top": details.get("prefill_top_tokens") or []}
        if options.prompt_only:  # the one token generated is not the client's
            return cls(index=index, text="", finish_reason="length", generated_tokens=0, **prompt)
        tokens = details.get("tokens") or []
        tops = details.get("top_tokens") or [[] for _ in tokens]
        text = ChoiceText(list(options.stops))
        received = [text.add(token, top) for token, top in zip(tokens, tops)]
        received.append(text.finish(details.get("finish_reason")))
        return cls(index=index, text="".join(r.text for r in received),
                   finish_reason=text.finish_reason(finish_reason(details.get("finish_reason"))),
                   generated_tokens=generated_tokens, tokens=[t for r in received for t in r.tokens],
                   cumulative_logprob=sum(t.get("logprob") or 0.0 for t in tokens), **prompt)


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


def best_of(results: list[ChoiceResult], options: ResponseOptions) -> list[ChoiceResult]:
    """Each prompt's `n` candidates with the highest cumulative logprob (all of them without
    `best_of`), indexed 0.. in prompt order."""
    kept = []
    for first in range(0, len(results), options.samples):
        candidates = results[first:first + options.samples]
        if options.samples > options.n:
            candidates = sorted(candidates, key=lambda r: r.cumulative_logprob, reverse=True)[:options.n]
        kept.extend(candidates)
    return [dataclasses.replace(r, index=i) for i, r in enumerate(kept)]


def chat_completion(envelope: Envelope, options: ResponseOptions, results: list[ChoiceResult],
                    prompt_tokens: int, completion_tokens: int, raw_bytes: TokenBytes, cached_tokens: int = 0) -> dict:
    choices = []
    for result in results:
        logprobs = chat_logprobs(result.tokens, raw_bytes) if options.logprobs else None
        message, reason = {"role": "assistant", "content": result.text}, result.finish_reason
        if options.tool_calls:
            reader = ToolCallReader(names=options.tool_names)
            reader.feed(result.text)
            reader.finish()
            message, reason = reader.message(), reader.finish_reason(reason)
        if options.legacy_functions:
            message, reason = as_function_call(message), legacy_reason(reason)
        choices.append({"index": result.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
    return envelope.body("chat.completion", choices, usage=usage(prompt_tokens, completion_tokens, cached_tokens))


def legacy_reason(reason: str) -> str:
    return "function_call" if reason == "tool_calls" else reason


def completion(envelope: Envelope, options: ResponseOptions, results: list[ChoiceResult],
               prompts: list[Prompt], prompt_tokens: int, completion_tokens: int, raw_bytes: TokenBytes,
               cached_tokens: int = 0) -> dict:
    choices = []
    for result in results:
        prompt = prompts[result.index // options.n]
        prefix = prompt.text if options.echo else ""
        logprobs = None
        if options.logprobs:
            echoed = prompt_logprobs(prompt.offsets, result.prefill, result.prefill_top, raw_bytes) \
                if options.echo else None
            logprobs = completion_logprobs(result.tokens, len(prefix), raw_bytes, echoed)
        choices.append({"index": result.index, "text": prefix + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    return envelope.body("text_completion", choices, usage=usage(prompt_tokens, completion_tokens, cached_tokens))
