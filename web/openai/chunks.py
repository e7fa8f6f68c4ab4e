"""The chunks of one OpenAI stream, choice by choice: text as `ChoiceText` releases it (held back
while it may begin a stop sequence), `role` in each choice's first chunk only (the SDK's stream
helper concatenates every `role` it sees), a closing chunk per choice with its finish reason,
then the usage. A completions choice with `echo` sends its prompt first (with `logprobs`, the
prompt's tokens too, which come with its first token's event)."""
from __future__ import annotations

from web.openai.choice_text import ChoiceText, Received
from web.openai.logprobs import TokenBytes, chat_logprobs, completion_logprobs, prompt_logprobs
from web.openai.params import ResponseOptions
from web.openai.prompts import Prompt
from web.openai.responses import Envelope, legacy_reason, usage
from web.openai.tool_calls import ToolCallReader, as_function_call


class Chunker:
    def __init__(self, envelope: Envelope, options: ResponseOptions, prompts: list[Prompt], raw_bytes: TokenBytes):
        self.envelope, self.options, self.prompts, self._raw_bytes = envelope, options, prompts, raw_bytes
        self._texts: dict[int, ChoiceText] = {}
        self._readers: dict[int, ToolCallReader] = {}  # choice -> its tool call (tool grammar only)
        self._started: set[int] = set()  # choices whose first chunk was sent
        self._prefill: dict[int, tuple[list[dict], list[list[dict]] | None]] = {}  # choice -> its scored prompt

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.envelope.kind == "chat" else "text_completion"

    def token(self, index: int, token: dict, top: list[dict] | None, prefill: list[dict] | None = None,
              prefill_top: list[list[dict]] | None = None) -> list[dict]:
        """`prefill` (and `prefill_top`): the prompt's scored tokens, with a choice's first token
        when echo asks for its logprobs."""
        if prefill:
            self._prefill[index] = (prefill, prefill_top)
        if self.options.prompt_only:  # the one token generated is not the client's
            return []
        return self._chunks(index, self._text(index).add(token, top))

    def finish(self, index: int, tgi_reason: str | None, reason: str) -> list[dict]:
        """`reason`: OpenAI's finish reason from the engine's (`tgi_reason`)."""
        if self.options.prompt_only:
            return [self._completion_text(index, Received(), finish_reason="length")]
        text = self._text(index)
        chunks = self._chunks(index, text.finish(tgi_reason))
        reason = text.finish_reason(reason)
        if self.envelope.kind != "chat":
            return [*chunks, self._completion_text(index, Received(), finish_reason=reason)]
        if self.options.tool_calls:
            reader = self._reader(index)
            chunks += [self._delta(index, delta) for delta in reader.finish()]
            reason = reader.finish_reason(reason)
        if self.options.legacy_functions:
            reason = legacy_reason(reason)
        return [*chunks, self._delta(index, {}, finish_reason=reason)]

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return self.envelope.body(self._object, [], usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    def _chunks(self, index: int, received: Received) -> list[dict]:
        if not received:
            return []
        if self.envelope.kind != "chat":
            return [self._completion_text(index, received)]
        if self.options.tool_calls:
            return [self._delta(index, delta) for delta in self._reader(index).feed(received.text)]
        logprobs = chat_logprobs(received.tokens, self._raw_bytes) if self.options.logprobs else None
        return [self._delta(index, {"content": received.text}, logprobs=logprobs)]

    def _delta(self, index: int, delta: dict, *, logprobs: dict | None = None, finish_reason: str | None = None):
        """A chat chunk; the choice's first one says whose message it is."""
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        if self.options.legacy_functions:
            delta = as_function_call(delta)
        return self._choice(index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)

    def _completion_text(self, index: int, received: Received, finish_reason: str | None = None) -> dict:
        echo = self._echo(index)
        logprobs = None
        if self.options.logprobs and (received.tokens or echo):
            offset = len(self._prompt(index).text) if self.options.echo else 0
            logprobs = completion_logprobs(received.tokens, offset, self._raw_bytes,
                                           self._prompt_logprobs(index) if echo else None)
        return self._choice(index, text=echo + received.text, logprobs=logprobs, finish_reason=finish_reason)

    def _prompt_logprobs(self, index: int) -> dict:
        prefill, prefill_top = self._prefill.pop(index, ([], None))
        return prompt_logprobs(self._prompt(index).offsets, prefill, prefill_top, self._raw_bytes)

    def _choice(self, index: int, **fields) -> dict:
        fields.setdefault("logprobs", None)
        choice = {"index": index, **fields}
        extra = {"usage": None} if self.options.include_usage else {}
        return self.envelope.body(self._object, [choice], **extra)

    def _text(self, index: int) -> ChoiceText:
        return self._texts.setdefault(index, ChoiceText(list(self.options.stops)))

    def _reader(self, index: int) -> ToolCallReader:
        return self._readers.setdefault(index, ToolCallReader(names=self.options.tool_names))

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.options.n]

    def _echo(self, index: int) -> str:
        """The prompt, before a completions choice's first text (with `echo`)."""
        if not self.options.echo or index in self._started:
            return ""
        self._started.add(index)
        return self._prompt(index).text
