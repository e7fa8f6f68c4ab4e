"""Anthropic's stop sequences: the text is cut before the first one, as on chat, and the answer
says which one matched (`stop_sequence`), which the chat path does not tell. The engine stops on
them (they stay in its parameters); the chat path is asked not to cut, and this cut reads the
whole text, holding back what may begin a stop sequence (`ChoiceText`)."""
from __future__ import annotations

from web.openai.choice_text import ChoiceText


class StopCut:
    def __init__(self, stops: list[str]):
        self._stops = [stop for stop in stops if stop]
        self._text = ChoiceText(self._stops)
        self._raw = ""  # everything generated, the stop sequence and past it included

    def feed(self, piece: str) -> str:
        """The text the client may get now."""
        self._raw += piece
        return self._text.add({"text": piece}).text

    def finish(self) -> str:
        return self._text.finish(None).text

    @property
    def matched(self) -> str | None:
        """The stop sequence the text was cut at, once it was."""
        if not self._text.stopped:
            return None
        at = len(self._text.text)
        return next((stop for stop in self._stops if self._raw.startswith(stop, at)), None)

    def stop_reason(self, finish_reason: str) -> str:
        """Anthropic's, from the chat finish reason."""
        if self.matched is not None:
            return "stop_sequence"
        return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish_reason, "end_turn")
