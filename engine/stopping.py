"""When a request stops: length, then EOS, then stop sequences (TGI's order).

Stop sequences are searched in a bounded tail of the generated text, never the whole text, so
each check costs the same however long the generation runs. The tail keeps the last
`longest stop sequence` characters, enough to find a stop sequence that spans tokens.
"""
from __future__ import annotations

from engine.outputs import FinishReason
from engine.params import StoppingParams


class StopChecker:
    """One request's stop state: how many tokens it has generated and the tail of its text."""

    def __init__(self, stopping: StoppingParams, eos_token_ids: frozenset[int]):
        self.stopping = stopping
        self.eos_token_ids = eos_token_ids
        self.generated_tokens = 0
        # An empty stop sequence would match before any text: it is ignored.
        self._stops = tuple(s for s in stopping.stop_sequences if s)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._tail = ""  # at most `_longest_stop` characters of the text so far

    def check(self, token_id: int, new_text: str) -> FinishReason | None:
        """Call once per generated token with the text it added; the reason to stop, or None."""
        self.generated_tokens += 1
        if self.generated_tokens >= self.stopping.max_new_tokens:
            return FinishReason.LENGTH
        if not self.stopping.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if self._longest_stop:
            # Any stop sequence that ends inside `new_text` lies within this window.
            window = self._tail + new_text  # at most longest + len(new_text) characters
            if any(stop in window for stop in self._stops):
                return FinishReason.STOP_SEQUENCE
            self._tail = window[-self._longest_stop :]
        return None
