"""One choice's text as an OpenAI client receives it: stop sequences cut out (OpenAI ends the text
before them, where TGI keeps them), and the tokens whose text the client got.

Fed token by token, it holds back text that may be the start of a stop sequence (a stop string
split across tokens), so a stream never sends what the whole answer then cuts; the non-streamed
answer is the same object fed every token at once, so both agree. A token counts as received
when any of its text was; the end-of-sequence token (no text) never is.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def token_text(token: dict) -> str:
    """What a token adds to the answer's text (special tokens add nothing, as in `generated_text`)."""
    return "" if token.get("special") else token.get("text") or ""


@dataclass(frozen=True)
class ReceivedToken:
    start: int  # where its text starts in the choice's text
    token: dict  # TGI Token: id, text, logprob, special
    top: list[dict] = field(default_factory=list)  # its most likely alternatives


@dataclass(frozen=True)
class Received:
    """What one step releases to the client."""

    text: str = ""
    tokens: list[ReceivedToken] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.tokens)


class ChoiceText:
    def __init__(self, stops: list[str]):
        self._stops = [stop for stop in stops if stop]  # an empty stop would match before any text
        self.text = ""  # the choice's text so far (cut at the stop sequence, once found)
        self.sent = 0  # characters released
        self.stopped = False  # a stop sequence was found: nothing after it is ever released
        self._pending: list[ReceivedToken] = []

    def add(self, token: dict, top: list[dict] | None = None) -> Received:
        self._pending.append(ReceivedToken(len(self.text), token, list(top or [])))
        if not self.stopped:
            self.text += token_text(token)
        return self._release(self._safe_end())

    def finish(self, tgi_reason: str | None) -> Received:
        """The rest: held-back text that never became a stop sequence, and the last tokens (not
        a final end-of-sequence token)."""
        received = self._release(len(self.text))
        rest = [] if self.stopped else self._pending
        if rest and tgi_reason == "eos_token" and rest[-1].token.get("special"):
            rest = rest[:-1]
        self._pending = []
        return Received(received.text, received.tokens + rest)

    def finish_reason(self, reason: str) -> str:
        """OpenAI's: `stop` once a stop sequence was cut, even if the engine reached its length."""
        return "stop" if self.stopped else reason

    def _safe_end(self) -> int:
        """How far the text may be released: up to a stop sequence, or short of a possible one."""
        if self.stopped:
            return self.sent
        found = [at for at in (self.text.find(stop, self.sent) for stop in self._stops) if at >= 0]
        if found:
            self.stopped, self.text = True, self.text[:min(found)]
            return len(self.text)
        return len(self.text) - self._possible_stop_start()

    def _possible_stop_start(self) -> int:
        """The length of the longest unreleased end of the text that begins some stop sequence."""
        unreleased = len(self.text) - self.sent
        for length in range(min(unreleased, max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _release(self, end: int) -> Received:
        text, self.sent = self.text[self.sent:end], max(self.sent, end)
        tokens = [t for t in self._pending if t.start < end]
        self._pending = self._pending[len(tokens):]
        return Received(text, tokens)
