"""Collect one engine request's events into TGI's Details shape (replica side)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import Finish, TokenEvent


@dataclass
class Generation:
    """Everything one engine request produced."""

    seed: int | None
    tokens: list[dict] = field(default_factory=list)
    top_tokens: list[list[dict]] = field(default_factory=list)
    prefill: list[dict] = field(default_factory=list)
    prefill_top_tokens: list[list[dict]] = field(default_factory=list)  # when the job asks for them
    finish: Finish | None = None

    def add(self, event: TokenEvent) -> None:
        self.tokens.append(event.token.to_dict())
        if event.top_tokens:
            self.top_tokens.append([t.to_dict() for t in event.top_tokens])
        if event.prefill:
            self.prefill = [t.to_dict() for t in event.prefill]
        if event.prefill_top_tokens:
            self.prefill_top_tokens = [[t.to_dict() for t in top] for top in event.prefill_top_tokens]
        if event.finish is not None:
            self.finish = event.finish

    @property
    def mean_logprob(self) -> float:
        values = [t["logprob"] for t in self.tokens if t["logprob"] is not None]
        return sum(values) / len(values) if values else float("-inf")

    def details(self, with_tokens: bool = True) -> dict:
        details = {
            "finish_reason": self.finish.reason.value,
            "generated_tokens": self.finish.generated_tokens,
            "seed": self.seed,
        }
        if with_tokens:
            details.update(prefill=self.prefill, tokens=self.tokens)
            if self.top_tokens:
                details["top_tokens"] = self.top_tokens
            if self.prefill_top_tokens:
                details["prefill_top_tokens"] = self.prefill_top_tokens
        return details


def best_of(generations: list[Generation]) -> tuple[Generation, list[Generation]]:
    """TGI's best_of: the winner has the highest mean token logprob; the rest are returned."""
    ranked = sorted(generations, key=lambda g: g.mean_logprob, reverse=True)
    return ranked[0], ranked[1:]


def final_details(winner: Generation, losers: list[Generation], with_tokens: bool) -> dict:
    details = winner.details(with_tokens)
    if losers:
        details["best_of_sequences"] = [
            {"generated_text": g.finish.generated_text, **g.details(with_tokens=True)} for g in losers
        ]
    return details
